"""Where a concept's coref/retain lists come from, first match wins:
(a) a curated file, (b) the CorefConcept dataset, (c) the LLM."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pydantic import ValidationError

from .concepts import Concept
from .constants import LIST_LENGTH
from .corefconcept import find_entry, import_entry
from .digests import files_sha256
from .lists import ConceptLists, Provenance, Warning_, describe_errors, write_model
from .llm import generate_lists
from .serving import call_served
from .settings import ListSettings, LlmRuntime

log = logging.getLogger(__name__)


def curated_lists(path: Path, concept: Concept) -> ConceptLists:
    """A hand-refined list file; data as written, with warnings for irregularities."""
    where = f"curated list {path} of {concept.text!r}"
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise ListsError(f"{where}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(data, dict):
        raise ListsError(f"{where}: expected a JSON object with corefs and retains")
    data.setdefault("concept", concept.text)
    data["id"], data["category"] = concept.id, concept.category
    warnings = [
        Warning_(
            concept=concept.text,
            field=name,
            what=f"{len(data.get(name, []))} items, expected {LIST_LENGTH}",
        )
        for name in ("corefs", "retains")
        if len(data.get(name, [])) != LIST_LENGTH
    ]
    provenance = data.get("provenance") or {}
    data["provenance"] = Provenance(
        source="curated",
        model=provenance.get("model"),
        prompt_version=provenance.get("prompt_version"),
        warnings=[*provenance.get("warnings", []), *warnings],
    ).model_dump()
    try:
        return ConceptLists.model_validate(data)
    except ValidationError as err:
        raise ListsError(f"{where}: {describe_errors(err)}") from None


class ListsError(ValueError):
    """A curated list file that cannot be read; the message names the file and concept."""


def build_lists(
    concept: Concept,
    settings: ListSettings,
    runtime: LlmRuntime,
    server_log: str | Path | None = None,
    dataset_file: str | Path | None = None,
) -> ConceptLists:
    """Curated file, else the dataset's entry (from the file of the concept's category), else
    the LLM; the provenance says which."""
    curated = Path(settings.curated_dir) / f"{concept.id}.json" if settings.curated_dir else None
    if curated and curated.is_file():
        log.info("%s: curated list %s", concept.text, curated)
        return curated_lists(curated, concept)
    if dataset_file:
        found = find_entry(dataset_file, concept.text)
        if found:
            entry, source_file = found
            log.info("%s: CorefConcept entry in %s", concept.text, source_file)
            return import_entry(
                entry,
                concept,
                source_file.name,
                origin=f"{settings.dataset.rstrip('/')}/{source_file.name}",
                sha256=files_sha256([source_file]),
            )
        log.info(
            "%s: not in the CorefConcept dataset (%s): asking the LLM", concept.text, dataset_file
        )
    log.info("%s: asking LLM %s", concept.text, settings.model)
    return call_served(
        lambda base_url: generate_lists(concept, settings, runtime, base_url),
        runtime=runtime,
        model=settings.model,
        log_path=server_log,
    )


def run(
    concept: Concept,
    settings: ListSettings,
    runtime: LlmRuntime,
    output: str,
    server_log: str | None = None,
    dataset_file: str | None = None,
) -> None:
    lists = build_lists(concept, settings, runtime, server_log, dataset_file)
    for warning in lists.provenance.warnings:
        log.warning("%s: %s: %s", warning.concept, warning.field, warning.what)
    write_model(lists, output)
