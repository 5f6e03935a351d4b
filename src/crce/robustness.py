"""Robustness to rephrasing (the `robustness` target): does an erased concept come back when
the prompt avoids its name? Per concept, K prompts that depict the target without naming it
(from the LLM through the lists' structured-output path, validated: none contains the target
or a coref; or a curated file), and templates over the target and its test corefs ("a
painting of {}"); judged exactly as Table 1's target images (does the image show the target?).
Acc_P, the share still showing it, is reported beside Acc_U."""

from __future__ import annotations

import json
from pathlib import Path

from .concepts import Concept
from .lists import Split
from .settings import ListSettings, LlmRuntime, RobustnessSettings


def build_prompts(
    concept: Concept,
    split: Split,
    settings: RobustnessSettings,
    list_settings: ListSettings,
    runtime: LlmRuntime,
    server_log: str | None = None,
) -> dict:
    """The concept's robustness prompts, each with its kind (paraphrase or template)."""
    corefs = [item.text for _, item in split.items("coref")]
    prompts, provenance = [], {"source": None}
    curated = Path(settings.curated_dir or "", f"{concept.id}.json")
    if settings.curated_dir and curated.is_file():
        prompts = [str(p) for p in json.loads(curated.read_text(encoding="utf-8"))["prompts"]]
        provenance = {"source": "curated", "file": str(curated)}
    elif settings.llm_prompts:
        from .llm import generate_paraphrases
        from .serving import call_served

        prompts, raw, attempts = call_served(
            lambda url: generate_paraphrases(
                concept, corefs, settings.llm_prompts, list_settings, runtime, url
            ),
            runtime=runtime,
            model=list_settings.model,
            log_path=server_log,
        )
        provenance = {"source": "llm", "model": list_settings.model, "attempts": attempts,
                      "prompt_version": settings.prompt_version, "raw_response": raw}  # fmt: skip
    subjects = [concept.text, *(i.text for i in split.coref_test)]
    templates = [t.format(s) for t in settings.templates for s in subjects]
    items = [{"text": p, "kind": "paraphrase"} for p in prompts]
    items += [{"text": t, "kind": "template"} for t in dict.fromkeys(templates)]
    return {"concept": concept.text, "id": concept.id, "prompts": items, "provenance": provenance}


def run_prompts(*, split_path, settings, list_settings, runtime, output, server_log):
    """The `robust_prompts` rule; the concept is the split's."""
    from .lists import read_split

    split = read_split(split_path)
    concept = Concept(id=split.id, text=split.concept, category=split.category)
    data = build_prompts(concept, split,
                         RobustnessSettings(**settings), ListSettings(**list_settings),
                         LlmRuntime(**runtime), server_log)  # fmt: skip
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(data, indent=2) + "\n")
