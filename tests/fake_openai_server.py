"""A fake OpenAI-compatible server for tests (the boundary that stands in for OpenAI/vLLM).

Run: python tests/fake_openai_server.py --port P --model NAME [--script FILE] [--die-after N]
     [--chat]

Chat requests without an image get coref/retain lists; with an image, a vLLM-shaped yes/no
answer with logprobs. `--script` names a JSON list of behaviours for successive list requests
(good, malformed, fenced, short, duplicates, target, overlap, error500, slow, error429,
names_target: a robustness prompt that names its concept);
when it runs out, answers are good. Requests vLLM would reject get a 400. With --chat the judge
answers like most chat APIs ("Yes.", "No, the image shows something else.", sometimes "I
cannot tell."; an image whose hash ends in 1 is never readable) and, like OpenAI's own API,
rejects vLLM's `structured_outputs` field.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LEVELS = ["Very High"] * 3 + ["High"] * 3 + ["Normal"] * 3 + ["Low"] * 3 + ["Very Low"] * 3


def good_lists(concept: str) -> dict:
    return {
        "corefs": [{"text": f"{concept} alias {i}", "certainty": LEVELS[i]} for i in range(15)],
        "retains": [
            {"text": f"neighbour {i} of {concept}", "certainty": LEVELS[i]} for i in range(15)
        ],
    }


def list_answer(behaviour: str, concept: str) -> str:
    data = good_lists(concept)
    if behaviour == "malformed":
        return '{"corefs": [ {"text": "oops"'
    if behaviour == "fenced":
        return "```json\n" + json.dumps(data) + "\n```"
    if behaviour == "short":
        data["corefs"] = data["corefs"][:12]
    elif behaviour == "duplicates":
        data["retains"][3] = dict(data["retains"][2])
    elif behaviour == "target":
        data["corefs"][0] = {"text": concept, "certainty": "Very High"}
    elif behaviour == "overlap":
        data["retains"][0] = dict(data["corefs"][5])
    return json.dumps(data)


def p_yes(image: bytes, question: str) -> float:
    """Deterministic stand-in for a judge: a pseudo-probability from the image and question."""
    digest = hashlib.sha256(image + question.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32


class State:
    def __init__(
        self,
        model: str,
        script: list[str],
        die_after: int | None,
        latency: float = 0.0,
        chat: bool = False,
    ):
        self.chat = chat
        self.latency = latency
        self.model = model
        self.script = list(script)
        self.die_after = die_after
        self.lock = threading.Lock()
        self.list_requests = 0
        self.judge_requests = 0

    def next_behaviour(self) -> str:
        with self.lock:
            self.list_requests += 1
            return self.script.pop(0) if self.script else "good"


def make_handler(state: State):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, code: int, body: dict):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, code: int, message: str):
            self._send(
                code, {"error": {"message": message, "type": "BadRequestError", "code": code}}
            )

        def do_GET(self):
            if self.path in ("/health", "/v1/health"):
                return self._send(200, {})
            if self.path == "/stats":  # what the tests count: requests answered or refused
                with state.lock:
                    counts = {"list": state.list_requests, "judge": state.judge_requests}
                return self._send(200, counts)
            if self.path == "/v1/models":
                return self._send(
                    200, {"object": "list", "data": [{"id": state.model, "object": "model"}]}
                )
            return self._error(404, "not found")

        def do_POST(self):
            if self.path != "/v1/chat/completions":
                return self._error(404, "not found")
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if body.get("model") != state.model:
                return self._error(404, f"The model `{body.get('model')}` does not exist.")
            images, texts = [], []
            for message in body.get("messages", []):
                content = message.get("content")
                parts = (
                    content if isinstance(content, list) else [{"type": "text", "text": content}]
                )
                for part in parts:
                    if part.get("type") == "image_url":
                        images.append(part["image_url"]["url"])
                    elif part.get("type") == "text":
                        texts.append(part.get("text") or "")
            if images:
                return self._judge(body, images, " ".join(texts))
            return self._lists(body, texts)

        def _lists(self, body, texts):
            behaviour = state.next_behaviour()
            if behaviour == "error500":
                return self._error(500, "internal error")
            if behaviour == "error429":
                return self._error(429, "rate limited")
            if behaviour == "slow":
                time.sleep(float(os.environ.get("FAKE_SLOW_SECONDS", "3")))
            text = texts[1] if len(texts) > 1 else texts[0]
            asked = re.search(r'Write (\d+) different short prompts .* draw "([^"]+)"', text)
            if asked:  # robustness: prompts that must not name the concept
                k, concept = int(asked.group(1)), asked.group(2)
                prompts = [f"an unnamed thing seen from angle {i}" for i in range(k)]
                if behaviour == "names_target":
                    prompts[0] = f"a {concept} in a field"
                return self._send(200, completion(state.model, json.dumps({"prompts": prompts})))
            match = re.search(r'erasing the concept "([^"]+)"', text)
            concept = match.group(1) if match else "thing"
            return self._send(200, completion(state.model, list_answer(behaviour, concept)))

        def _judge(self, body, images, question):
            # What vLLM would reject for this model and these flags.
            if len(images) > 1:
                return self._error(400, "At most 1 image(s) may be provided in one prompt.")
            url = images[0]
            if not url.startswith("data:image/") or ";base64," not in url:
                return self._error(400, "Only data URLs with base64 images are accepted here.")
            top = body.get("top_logprobs")
            if top is not None and (not body.get("logprobs") or not 0 <= top <= 20):
                return self._error(
                    400, "top_logprobs needs logprobs=true and 0 <= top_logprobs <= 20"
                )
            if "guided_choice" in body:
                return self._error(400, "guided_choice was removed; use structured_outputs")
            if state.chat and "structured_outputs" in body:
                return self._error(
                    400, "Unrecognized request argument supplied: structured_outputs"
                )
            choice = (body.get("structured_outputs") or {}).get("choice")
            with state.lock:
                state.judge_requests += 1
                count = state.judge_requests
            if state.die_after is not None and count > state.die_after:
                os._exit(1)  # a crash mid-run, as a dying vLLM would
            time.sleep(state.latency)  # a model's time per request
            image = base64.b64decode(url.split(";base64,", 1)[1])
            asked_again = "one word" in question
            question = question.split(" Answer with one word")[0]
            p = min(max(p_yes(image, question), 1e-6), 1 - 1e-6)
            answer = "yes" if p >= 0.5 else "no"
            if state.chat:
                kind = hashlib.sha256(image).digest()[-1] % 10
                if kind == 1 or (kind == 2 and not asked_again):
                    return self._send(200, completion(state.model, "I cannot tell."))
                text = "Yes." if answer == "yes" else "No, the image shows something else."
                answer = text
            if choice and answer not in choice:
                answer = choice[0]
            logprobs = None
            if body.get("logprobs"):
                tops = [
                    {"token": "yes", "logprob": math.log(p), "bytes": list(b"yes")},
                    {"token": "no", "logprob": math.log(1 - p), "bytes": list(b"no")},
                ][: max(top or 0, 1)]
                entry = {
                    "token": answer,
                    "logprob": math.log(p if answer == "yes" else 1 - p),
                    "bytes": list(answer.encode()),
                    "top_logprobs": tops,
                }
                logprobs = {"content": [entry]}
            return self._send(200, completion(state.model, answer, logprobs))

    return Handler


def completion(model: str, content: str, logprobs: dict | None = None) -> dict:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "logprobs": logprobs,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--script", help="JSON file with a list of list-request behaviours")
    parser.add_argument("--die-after", type=int, help="exit after this many judge requests")
    parser.add_argument("--startup-delay", type=float, default=0.0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per judge request")
    parser.add_argument("--chat", action="store_true", help="answer like a chat API")
    args = parser.parse_args()
    script = json.load(open(args.script)) if args.script else []
    time.sleep(args.startup_delay)
    server = ThreadingHTTPServer(
        ("127.0.0.1", args.port),
        make_handler(State(args.model, script, args.die_after, args.latency, args.chat)),
    )
    server.serve_forever()


if __name__ == "__main__":
    main()
