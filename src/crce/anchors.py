"""Concept Ablation's anchor of a concept from the LLM (`anchors: llm`): the `anchor` rule asks
the lists' LLM, through the validated structured path, for the concept's category and
captions of images holding it (CA's convention and its LLM captions, concept-ablation
utils.py L371-589), refusing the target and its corefs; `results/anchors/{concept}.json`
keeps the answer and its provenance. The curated route is a TSV (crce.methods.ca)."""

from __future__ import annotations

import json
from pathlib import Path

from .concepts import Concept
from .settings import ListSettings, LlmRuntime


def run_anchor(*, split_path: str, captions: int, settings: dict, runtime: dict, output: str,
               server_log: str | None = None) -> None:  # fmt: skip
    """The `anchor` rule; the concept and its corefs are the split's."""
    from .lists import read_split
    from .llm import generate_anchor
    from .serving import call_served

    split = read_split(split_path)
    concept = Concept(id=split.id, text=split.concept, category=split.category)
    corefs = [item.text for _, item in split.items("coref")]
    lists, llm = ListSettings(**settings), LlmRuntime(**runtime)
    found, raw, attempts = call_served(
        lambda url: generate_anchor(concept, corefs, max(captions, 1), lists, llm, url),
        runtime=llm, model=lists.model, log_path=server_log,
    )  # fmt: skip
    data = {"concept": concept.text, "id": concept.id, **found,
            "provenance": {"source": "llm", "model": lists.model, "attempts": attempts,
                           "raw_response": raw}}  # fmt: skip
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
