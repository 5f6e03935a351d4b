"""The official CorefConcept dataset (`{object,ip,celebrity}.json`): fetching it at the pinned
commit with checksums, and importing its entries.

Entries are matched by concept text (case-insensitive), never by `type`: the real files put
`Apple (company)` in object.json with type `IP`. Imported lists are data, not LLM output:
irregularities are kept and recorded as warnings; structural errors are errors.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .concepts import Concept
from .constants import N_TEST, N_TRAIN
from .fetch import FetchError, fetch_file, is_url
from .lists import Certainty, ConceptLists, GivenSplit, Item, Provenance, Warning_

PARTS = ("train-coref", "test-coref", "train-retain", "test-retain")
EXPECTED_LENGTH = {
    "train-coref": N_TRAIN,
    "test-coref": N_TEST,
    "train-retain": N_TRAIN,
    "test-retain": N_TEST,
}
LOWEST = Certainty.very_low


log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset file that cannot be had or trusted, or a structurally broken entry."""


def check_local_dataset(source: str | None, concepts) -> None:
    """A local dataset folder must hold the file of every category the sheet has concepts in
    (parse time, before any job)."""
    if not source or is_url(source):
        return
    for category in sorted({c.category for c in concepts}):
        if not (Path(source) / f"{category}.json").is_file():
            names = ", ".join(c.text for c in concepts if c.category == category)
            raise DatasetError(
                f"corefs.dataset: {source} has no {category}.json, needed by the sheet's "
                f"{category} concepts ({names}); give the folder with that file, a URL, or null"
            )


def fetch(source: str, name: str, sha256: str | None, output: str | Path) -> None:
    """Fetch `{source}/{name}` to `output` once its sha256 matches: the `download` target runs
    this on the login node, jobs then read the file offline."""
    try:
        fetch_file(f"{source.rstrip('/')}/{name}", sha256, output, f"CorefConcept file {name}")
    except FetchError as err:
        raise DatasetError(str(err)) from None


def find_entry(source: str | Path, text: str) -> tuple[dict, Path] | None:
    """The entry whose `concept` equals `text` (case-insensitive), from a dataset file or any
    file of a dataset folder."""
    key = text.strip().casefold()
    source = Path(source)
    for path in [source] if source.is_file() else sorted(source.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        for entries in data.values() if isinstance(data, dict) else [data]:
            for entry in entries:
                if str(entry.get("concept", "")).strip().casefold() == key:
                    return entry, path
    return None


def _items(entry: dict, part: str, concept: str, warnings: list[Warning_]) -> list[Item]:
    where = f"concept {concept!r}, field {part!r}"
    texts = entry.get(part)
    labels = entry.get(f"{part}-certainty")
    if not isinstance(texts, list) or not isinstance(labels, list):
        raise DatasetError(f"{where}: list or its certainty labels missing")
    valid = {c.value for c in Certainty}
    for label in labels:
        if label not in valid:
            raise DatasetError(f"{where}: unknown certainty level {label!r}")
    if len(labels) < len(texts):
        warnings.append(
            Warning_(
                concept=concept,
                field=f"{part}-certainty",
                what=f"{len(labels)} labels for {len(texts)} items; "
                f"the missing {len(texts) - len(labels)} set to {LOWEST.value!r}",
            )
        )
        labels = labels + [LOWEST.value] * (len(texts) - len(labels))
    elif len(labels) > len(texts):
        warnings.append(
            Warning_(
                concept=concept,
                field=f"{part}-certainty",
                what=f"{len(labels)} labels for {len(texts)} items; extra labels dropped",
            )
        )
    if len(texts) != EXPECTED_LENGTH[part]:
        warnings.append(
            Warning_(
                concept=concept,
                field=part,
                what=f"{len(texts)} items, expected {EXPECTED_LENGTH[part]}",
            )
        )
    target = concept.strip().casefold()
    items = []
    for text, label in zip(texts, labels, strict=False):
        if str(text).strip().casefold() == target:
            warnings.append(
                Warning_(concept=concept, field=part, what=f"item {text!r} equals the target; kept")
            )
        items.append(Item(text=str(text), certainty=Certainty(label)))
    return items


def import_entry(
    entry: dict,
    concept: Concept,
    source_file: str,
    *,
    origin: str | None = None,
    sha256: str | None = None,
) -> ConceptLists:
    """Turn one dataset entry into the project's list file, keeping the dataset's split; the
    provenance names the file, where it came from and its sha256."""
    warnings: list[Warning_] = []
    parts = {part: _items(entry, part, concept.text, warnings) for part in PARTS}
    if entry.get("type", "").casefold() not in ("", concept.category):
        warnings.append(
            Warning_(
                concept=concept.text,
                field="type",
                what=f"dataset type {entry['type']!r} differs from the sheet's category "
                f"{concept.category!r}; the sheet's category is used",
            )
        )
    return ConceptLists(
        concept=concept.text,
        id=concept.id,
        category=concept.category,
        corefs=parts["train-coref"] + parts["test-coref"],
        retains=parts["train-retain"] + parts["test-retain"],
        given_split=GivenSplit(
            coref_train=[i.text for i in parts["train-coref"]],
            coref_test=[i.text for i in parts["test-coref"]],
            retain_train=[i.text for i in parts["train-retain"]],
            retain_test=[i.text for i in parts["test-retain"]],
        ),
        provenance=Provenance(
            source="corefconcept",
            model=source_file,
            warnings=warnings,
            origin=origin,
            sha256=sha256,
        ),
    )
