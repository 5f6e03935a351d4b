"""The toy world's OpenAI-compatible server: LLM (coref/retain lists) and judge in one.

    python -m crce_worlds.toy.server --port P --model NAME --weights resources/toy

Without an image, a chat request is answered like an LLM asked for a concept's lists (the
concept is read from the request; the lists come from the ontology). With an image, it is
answered like Qwen2-VL under vLLM: the shape classifier reads the image, the asked concept is
mapped to its shape through the ontology, and the answer is "yes"/"no" with logprobs.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import re
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from .classifier import load_classifier, read_image, to_tensor
from .world import concept_lists, shape_of

_CONCEPT = re.compile(r'concept "([^"]+)"')


def completion(model: str, content: str, logprobs: dict | None = None) -> dict:
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": content},
        "logprobs": logprobs,
        "finish_reason": "stop",
    }
    return {"id": "chatcmpl-toy", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": {"prompt_tokens": 0, "completion_tokens": 1, "total_tokens": 1}}  # fmt: skip


class ToyWorld:
    def __init__(self, weights: str):
        torch.set_num_threads(1)
        self.classifier, self.classes = load_classifier(weights)

    def lists(self, text: str) -> str:
        match = _CONCEPT.search(text)
        return json.dumps(concept_lists(match.group(1) if match else text.strip()))

    @torch.no_grad()
    def judge(self, image_png: bytes, question: str) -> tuple[str, float]:
        image = read_image(io.BytesIO(image_png))
        probs = self.classifier(to_tensor(image[None])).softmax(1)[0]
        asked = shape_of(question)
        if asked is None:
            return "no", 0.0
        p_yes = probs[self.classes.index(asked)].item()
        return ("yes" if probs.argmax().item() == self.classes.index(asked) else "no"), p_yes


def make_handler(world: ToyWorld, model: str):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/v1/models":
                return self._send(
                    200, {"object": "list", "data": [{"id": model, "object": "model"}]}
                )
            return self._send(200 if self.path == "/health" else 404, {})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path != "/v1/chat/completions" or body.get("model") != model:
                return self._send(
                    404, {"error": {"message": f"unknown model or path: {body.get('model')}"}}
                )
            texts, images = [], []
            for message in body.get("messages", []):
                content = message.get("content")
                for part in (
                    content if isinstance(content, list) else [{"type": "text", "text": content}]
                ):
                    if part.get("type") == "image_url":
                        images.append(part["image_url"]["url"].split(";base64,", 1)[1])
                    elif part.get("type") == "text":
                        texts.append(part.get("text") or "")
            if not images:
                try:
                    return self._send(200, completion(model, world.lists(" ".join(texts))))
                except KeyError as err:
                    return self._send(400, {"error": {"message": str(err)}})
            answer, p_yes = world.judge(base64.b64decode(images[0]), " ".join(texts))
            choices = (body.get("structured_outputs") or {}).get("choice") or ["yes", "no"]
            answer = answer if answer in choices else choices[0]
            p = min(max(p_yes, 1e-6), 1 - 1e-6)
            tops = [{"token": "yes", "logprob": math.log(p), "bytes": list(b"yes")},
                    {"token": "no", "logprob": math.log(1 - p), "bytes": list(b"no")}]  # fmt: skip
            entry = {
                "token": answer,
                "logprob": math.log(p if answer == "yes" else 1 - p),
                "bytes": list(answer.encode()),
                "top_logprobs": tops,
            }
            return self._send(
                200,
                completion(model, answer, {"content": [entry]} if body.get("logprobs") else None),
            )

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--weights", default="resources/toy")
    args = parser.parse_args()
    server = ThreadingHTTPServer(
        ("127.0.0.1", args.port), make_handler(ToyWorld(args.weights), args.model)
    )
    server.serve_forever()


if __name__ == "__main__":
    main()
