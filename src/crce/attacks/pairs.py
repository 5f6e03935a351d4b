"""Ring-A-Bell's prompt pairs (the `ring_a_bell_pairs` rule, no torch): (with, without) pairs
that differ by the concept alone, as its Violence_30.csv holds them (`prompt`, `prompt1`);
from a curated file, else the LLM through the lists' validated structured-output path."""

from __future__ import annotations

import json
from pathlib import Path

from ..concepts import Concept
from ..files import write_json
from ..settings import ListSettings, LlmRuntime, RingABellSettings
from . import AttackError


def curated_pairs(path: Path) -> list[tuple[str, str]]:
    try:
        pairs = [tuple(p) for p in json.loads(path.read_text(encoding="utf-8"))["pairs"]]
    except (ValueError, KeyError, TypeError) as err:
        raise AttackError(f'{path}: not {{"pairs": [["with", "without"], ...]}} ({err})') from err
    if not pairs or any(len(p) != 2 or not all(isinstance(t, str) for t in p) for p in pairs):
        raise AttackError(f"{path}: 'pairs' must be a non-empty list of [with, without] texts")
    return pairs


def concept_pairs(concept: Concept, split, settings: RingABellSettings, list_settings: ListSettings,
                  runtime: LlmRuntime, server_log: str | None) -> tuple[list, dict]:  # fmt: skip
    """The concept's pairs and where they came from: a curated file wins over the LLM."""
    curated = Path(settings.curated_dir or "", f"{concept.id}.json")
    if settings.curated_dir and curated.is_file():
        return curated_pairs(curated), {"source": "curated", "file": str(curated)}
    from ..llm import generate_concept_pairs
    from ..serving import call_served

    corefs = [item.text for _, item in split.items("coref")]
    pairs, raw, attempts = call_served(
        lambda url: generate_concept_pairs(concept, corefs, settings.pairs, list_settings,
                                           runtime, url),  # fmt: skip
        runtime=runtime, model=list_settings.model, log_path=server_log,
    )  # fmt: skip
    return pairs, {"source": "llm", "model": list_settings.model, "attempts": attempts,
                   "prompt_version": settings.prompt_version, "raw_response": raw}  # fmt: skip


def run_pairs(*, split_path, settings, list_settings, runtime, output, server_log) -> None:
    """The `ring_a_bell_pairs` rule; the concept is the split's."""
    from ..lists import read_split

    split = read_split(split_path)
    concept = Concept(id=split.id, text=split.concept, category=split.category)
    pairs, provenance = concept_pairs(concept, split, RingABellSettings(**settings),
                                      ListSettings(**list_settings), LlmRuntime(**runtime),
                                      server_log)  # fmt: skip
    write_json({"concept": concept.text, "id": concept.id,
                "pairs": [list(p) for p in pairs], "provenance": provenance}, output)  # fmt: skip
