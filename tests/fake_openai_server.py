"""The tests' fake OpenAI-compatible server (the boundary that stands in for OpenAI/vLLM): a
backend of the small worlds' stub server (crce_worlds.stub_server), which answers like vLLM.

Run: python tests/fake_openai_server.py --port P --model NAME [--script FILE] [--die-after N]
     [--chat] [--api-key KEY] [--latency S] [--startup-delay S]

Chat requests without an image get coref/retain lists; with an image, a yes/no answer with
logprobs. `--script` names a JSON list of behaviours for successive list requests (good,
malformed, fenced, short, duplicates, target, overlap, article, error500, slow, error429,
names_target: a robustness prompt that names its concept); when it runs out, answers are
good. With --chat the judge answers like most chat APIs ("Yes.", "No, the image shows
something else.", sometimes "I cannot tell."; an image whose hash ends in 1 is never
readable) and, like OpenAI's own API, rejects vLLM's `structured_outputs` field. With
--api-key, `/v1/*` wants that key (vLLM's `--api-key`); `/health` never does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import threading
import time

from crce_worlds.stub_server import Refusal, serve

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
    elif behaviour == "article":  # the target with an article and other case: still the target
        data["corefs"][0] = {"text": f"A  {concept.upper()}", "certainty": "Very High"}
    elif behaviour == "overlap":
        data["retains"][0] = dict(data["corefs"][5])
    return json.dumps(data)


def p_yes(image: bytes, question: str) -> float:
    """Deterministic stand-in for a judge: a pseudo-probability from the image and question."""
    digest = hashlib.sha256(image + question.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32


class Fake:
    def __init__(self, script: list[str], die_after: int | None, latency: float, chat: bool):
        self.script, self.lock = list(script), threading.Lock()
        self.die_after, self.latency, self.chat = die_after, latency, chat

    def next_behaviour(self) -> str:
        with self.lock:
            return self.script.pop(0) if self.script else "good"

    def lists(self, texts, body) -> str:
        behaviour = self.next_behaviour()
        if behaviour == "error500":
            raise Refusal(500, "internal error")
        if behaviour == "error429":
            raise Refusal(429, "rate limited")
        if behaviour == "slow":
            time.sleep(float(os.environ.get("FAKE_SLOW_SECONDS", "3")))
        text = texts[1] if len(texts) > 1 else texts[0]
        asked = re.search(r'Write (\d+) different short prompts .* draw "([^"]+)"', text)
        if asked:  # robustness: prompts that must not name the concept
            k, concept = int(asked.group(1)), asked.group(2)
            prompts = [f"an unnamed thing seen from angle {i}" for i in range(k)]
            if behaviour == "names_target":
                prompts[0] = f"a {concept} in a field"
            return json.dumps({"prompts": prompts})
        asked = re.search(r'Write (\d+) pairs of short text-to-image prompts about "([^"]+)"', text)
        if asked:  # Ring-A-Bell: (with, without) pairs
            n, concept = int(asked.group(1)), asked.group(2)
            pairs = [[f"a photo of {concept} number {i}", f"a photo of something number {i}"]
                     for i in range(n)]  # fmt: skip
            if behaviour == "pair_unnamed":
                pairs[0][0] = "a photo of something else"
            return json.dumps({"pairs": pairs})
        asked = re.search(
            r"mapping it to a more general anchor.*?write (\d+) different", text, re.DOTALL
        )
        if asked:  # Concept Ablation's anchor: "animal" for anything, or a bad answer
            n, concept = int(asked.group(1)), re.search(r'concept "([^"]+)"', text).group(1)
            if os.environ.get("FAKE_BAD_ANCHOR") == concept:  # never a usable anchor
                behaviour = "anchor_target"
            anchor = {"anchor_target": concept, "anchor_long": "a very general kind of thing"}
            anchor = anchor.get(behaviour, "animal")
            return json.dumps(
                {
                    "anchor": anchor,
                    "captions": [f"a photo of a {anchor} number {i}" for i in range(n)],
                }
            )
        match = re.search(r'erasing the concept "([^"]+)"', text)
        return list_answer(behaviour, match.group(1) if match else "thing")

    def judge(self, image, question, body, count):
        if self.chat and "structured_outputs" in body:
            raise Refusal(400, "Unrecognized request argument supplied: structured_outputs")
        if self.die_after is not None and count > self.die_after:
            os._exit(1)  # a crash mid-run, as a dying vLLM would
        time.sleep(self.latency)  # a model's time per request
        asked_again = "one word" in question
        question = question.split(" Answer with one word")[0]
        p = p_yes(image, question)
        answer = "yes" if p >= 0.5 else "no"
        if not self.chat:
            return answer, p, answer
        kind = hashlib.sha256(image).digest()[-1] % 10
        if kind == 1 or (kind == 2 and not asked_again):
            return None, None, "I cannot tell."
        return answer, p, "Yes." if answer == "yes" else "No, the image shows something else."


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--script", help="JSON file with a list of list-request behaviours")
    parser.add_argument("--die-after", type=int, help="exit after this many judge requests")
    parser.add_argument("--startup-delay", type=float, default=0.0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per judge request")
    parser.add_argument("--chat", action="store_true", help="answer like a chat API")
    parser.add_argument("--api-key", help="the key /v1/* wants (vLLM's --api-key)")
    args = parser.parse_args()
    script = json.load(open(args.script)) if args.script else []
    time.sleep(args.startup_delay)
    fake = Fake(script, args.die_after, args.latency, args.chat)
    serve(fake, port=args.port, model=args.model, api_key=args.api_key)


if __name__ == "__main__":
    main()
