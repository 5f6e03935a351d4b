"""The toy world's OpenAI-compatible server: LLM (coref/retain lists) and judge in one, a
backend of the small worlds' stub server (crce_worlds.stub_server).

    python -m crce_worlds.toy.server --port P --model NAME --weights resources/toy

Without an image, a chat request is answered like an LLM asked for a concept's lists (the
concept is read from the request; the lists come from the ontology). With an image, it is
answered like Qwen2-VL under vLLM: the shape classifier reads the image, the asked concept is
mapped to its shape through the ontology, and the answer is "yes"/"no" with logprobs.
"""

from __future__ import annotations

import argparse
import io
import json
import re

import torch

from ..stub_server import Refusal, serve
from .classifier import load_classifier, read_image, to_tensor
from .world import concept_lists, concept_pairs, shape_of

_CONCEPT = re.compile(r'concept "([^"]+)"')
_PAIRS = re.compile(r'Write (\d+) pairs of short text-to-image prompts about "([^"]+)"')


class ToyWorld:
    def __init__(self, weights: str):
        torch.set_num_threads(1)
        self.classifier, self.classes = load_classifier(weights)

    def lists(self, texts, body) -> str:
        text = " ".join(texts)
        pairs = _PAIRS.search(text)
        if pairs:  # Ring-A-Bell's concept vector: the shape with a colour, the colour alone
            return json.dumps({"pairs": concept_pairs(pairs.group(2), int(pairs.group(1)))})
        match = _CONCEPT.search(text)
        try:
            return json.dumps(concept_lists(match.group(1) if match else text.strip()))
        except KeyError as err:
            raise Refusal(400, str(err)) from None

    @torch.no_grad()
    def judge(self, image_png: bytes, question: str, body, count):
        image = read_image(io.BytesIO(image_png))
        probs = self.classifier(to_tensor(image[None])).softmax(1)[0]
        asked = shape_of(question)
        if asked is None:
            return "no", 0.0, "no"
        p_yes = probs[self.classes.index(asked)].item()
        answer = "yes" if probs.argmax().item() == self.classes.index(asked) else "no"
        return answer, p_yes, answer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--weights", default="resources/toy")
    parser.add_argument("--api-key", help="the key /v1/* wants (vLLM's --api-key)")
    args = parser.parse_args()
    serve(ToyWorld(args.weights), port=args.port, model=args.model, api_key=args.api_key)


if __name__ == "__main__":
    main()
