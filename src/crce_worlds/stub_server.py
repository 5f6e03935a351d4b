"""One stub OpenAI-compatible server for the small worlds: the tests' fake and the toy world's
LLM and judge are backends of it.

It answers like vLLM 0.33 serving a model: `GET /health` needs no key, `/v1/*` needs
`Authorization: Bearer KEY` when started with a key, `GET /v1/models` lists the served model,
and `POST /v1/chat/completions` answers a chat without an image as an LLM (the backend's
`lists`) and one with an image as a yes/no judge (the backend's `judge`), with vLLM's
request checks (one image per prompt, data URLs, `top_logprobs` needs `logprobs`). Fields
vLLM does not know are ignored with a warning, as vLLM does, and counted in `GET /stats`.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("stub_server")

# What a chat completion request of vLLM 0.33 accepts (its ChatCompletionRequest fields that a
# client of this project could send); anything else is ignored with a warning.
KNOWN_FIELDS = {
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
    "seed", "stop", "stream", "logprobs", "top_logprobs", "response_format",
    "structured_outputs", "presence_penalty", "frequency_penalty", "user",
}  # fmt: skip


class Refusal(Exception):
    """An HTTP error the backend answers with (code, message)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def completion(model: str, content: str, logprobs: dict | None = None) -> dict:
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": content},
        "logprobs": logprobs,
        "finish_reason": "stop",
    }
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    return {"id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage}  # fmt: skip


def yes_no_logprobs(answer: str, p_yes: float, top: int | None, token: str | None = None) -> dict:
    """vLLM's logprobs of a yes/no answer (`token`: its first token's text, the answer's own
    by default)."""
    p = min(max(p_yes, 1e-6), 1 - 1e-6)
    tops = [
        {"token": "yes", "logprob": math.log(p), "bytes": list(b"yes")},
        {"token": "no", "logprob": math.log(1 - p), "bytes": list(b"no")},
    ][: max(top or 0, 1)]
    entry = {
        "token": token or answer,
        "logprob": math.log(p if answer == "yes" else 1 - p),
        "bytes": list((token or answer).encode()),
        "top_logprobs": tops,
    }
    return {"content": [entry]}


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {"list": 0, "judge": 0}
        self.ignored: dict[str, int] = {}

    def count(self, kind: str) -> int:
        with self.lock:
            self.counts[kind] += 1
            return self.counts[kind]

    def ignore(self, fields: list[str]) -> None:
        with self.lock:
            for name in fields:
                self.ignored[name] = self.ignored.get(name, 0) + 1

    def snapshot(self) -> dict:
        with self.lock:
            return {**self.counts, "ignored": dict(self.ignored)}


def make_handler(backend, model: str, api_key: str | None = None):
    """`backend.lists(texts, body) -> str` and `backend.judge(image_bytes, question, body,
    count) -> (answer word, p_yes or None for no logprobs, the answer's text)`; either may
    raise Refusal."""
    stats = Stats()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, code: int, message: str) -> None:
            self._send(code, {"error": {"message": message, "type": "BadRequestError",
                                        "code": code}})  # fmt: skip

        def _authorised(self) -> bool:
            if api_key and self.headers.get("Authorization") != f"Bearer {api_key}":
                self._error(401, "Unauthorized")
                return False
            return True

        def do_GET(self):
            if self.path == "/health":
                return self._send(200, {})
            if self.path == "/stats":  # what the tests count
                return self._send(200, stats.snapshot())
            if not self._authorised():
                return None
            if self.path == "/v1/models":
                return self._send(200, {"object": "list",
                                        "data": [{"id": model, "object": "model"}]})  # fmt: skip
            return self._error(404, "not found")

        def do_POST(self):
            if not self._authorised():
                return None
            if self.path != "/v1/chat/completions":
                return self._error(404, "not found")
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            unknown = sorted(set(body) - KNOWN_FIELDS)
            if unknown:  # vLLM logs "The following fields were present ... but ignored"
                log.warning("ignored fields: %s", ", ".join(unknown))
                stats.ignore(unknown)
            if body.get("model") != model:
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
            try:
                if not images:
                    stats.count("list")
                    return self._send(200, completion(model, backend.lists(texts, body)))
                return self._judge(body, images, " ".join(texts))
            except Refusal as refusal:
                return self._error(refusal.code, refusal.message)

        def _judge(self, body, images, question):
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
            count = stats.count("judge")
            image = base64.b64decode(url.split(";base64,", 1)[1])
            answer, p_yes, text = backend.judge(image, question, body, count)
            choice = (body.get("structured_outputs") or {}).get("choice")
            if choice and answer not in choice:
                answer = text = choice[0]
            logprobs = None
            if body.get("logprobs") and p_yes is not None:
                logprobs = yes_no_logprobs(answer, p_yes, top, token=text)
            return self._send(200, completion(model, text, logprobs))

    Handler.stats = stats
    return Handler


def serve(backend, *, port: int, model: str, api_key: str | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(backend, model, api_key))
    server.serve_forever()
