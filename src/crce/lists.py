"""The coref/retain list files: one pydantic model per file, used by every reader and writer."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .constants import GROUPS, Category
from .files import damaged, rebuild_hint


class Certainty(StrEnum):
    very_high = "Very High"
    high = "High"
    normal = "Normal"
    low = "Low"
    very_low = "Very Low"


# Paper, section 3: certainty level -> loss weight.
CERTAINTY_WEIGHTS = {
    Certainty.very_high: 1.0,
    Certainty.high: 0.8,
    Certainty.normal: 0.6,
    Certainty.low: 0.4,
    Certainty.very_low: 0.2,
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Item(_Strict):
    text: str = Field(min_length=1)
    certainty: Certainty


class WeightedItem(Item):
    weight: float

    @classmethod
    def of(cls, item: Item) -> WeightedItem:
        return cls(
            text=item.text, certainty=item.certainty, weight=CERTAINTY_WEIGHTS[item.certainty]
        )


class GivenSplit(_Strict):
    """A split that came with the source (the CorefConcept dataset has one)."""

    coref_train: list[str]
    coref_test: list[str]
    retain_train: list[str]
    retain_test: list[str]


class Warning_(_Strict):
    concept: str
    field: str
    what: str


class Provenance(_Strict):
    source: Literal["curated", "corefconcept", "llm", "toy"]
    model: str | None = None
    # The file the lists were read from (dataset URL or path) and its sha256.
    origin: str | None = None
    sha256: str | None = None
    prompt_version: str | None = None
    raw_response: str | None = None
    attempts: int | None = None
    warnings: list[Warning_] = []


class ConceptLists(_Strict):
    """`results/corefs/{concept}.json`."""

    concept: str
    id: str
    category: Category
    corefs: list[Item]
    retains: list[Item]
    given_split: GivenSplit | None = None
    provenance: Provenance


class Split(_Strict):
    """`results/splits/{concept}.json`."""

    concept: str
    id: str
    category: Category
    seed: int | None = None  # None when the source's own split was used
    coref_train: list[WeightedItem]
    coref_test: list[WeightedItem]
    retain_train: list[WeightedItem]
    retain_test: list[WeightedItem]

    def items(self, *kinds: str) -> list[tuple[str, WeightedItem]]:
        """(group, item) of the lists, in Table 1's group order; `kinds` ("coref", "retain",
        or a group) picks some of them."""
        groups = [g for g in GROUPS[1:] if not kinds or any(g.startswith(k) for k in kinds)]
        return [(group, item) for group in groups for item in getattr(self, group)]

    def prompts(self) -> list[tuple[str, str]]:
        """(group, text) of every prompt of the concept: the target, then the lists' items."""
        return [("target", self.concept)] + [(g, item.text) for g, item in self.items()]


def describe_errors(err: ValidationError, most: int = 5) -> str:
    """A validation error in one line: `field.path: problem; ...` (the first few)."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" if e["loc"] else e["msg"]
        for e in err.errors()[:most]
    )


def write_model(model: BaseModel, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(model.model_dump_json(indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)  # atomic: a reader never sees half a file


def _read(model: type[BaseModel], path: str | Path):
    """A file this workflow wrote; a damaged one is an error saying how to rebuild it."""
    try:
        return model.model_validate_json(Path(path).read_text(encoding="utf-8"))
    except (ValidationError, OSError, UnicodeDecodeError) as err:
        detail = describe_errors(err) if isinstance(err, ValidationError) else err
        raise damaged(path, detail, rebuild_hint(path)) from None


def read_lists(path: str | Path) -> ConceptLists:
    return _read(ConceptLists, path)


def read_split(path: str | Path) -> Split:
    return _read(Split, path)


def export_schemas(folder: str | Path) -> list[Path]:
    """Write the JSON schemas of the list and split files (kept in workflow/schemas/)."""
    folder = Path(folder)
    written = []
    for name, model in (("corefs.schema.json", ConceptLists), ("split.schema.json", Split)):
        target = folder / name
        target.write_text(json.dumps(model.model_json_schema(), indent=2) + "\n", encoding="utf-8")
        written.append(target)
    return written
