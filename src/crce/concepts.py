"""The concept sheet: one row per concept to erase, validated before any job starts."""

from __future__ import annotations

import csv
import hashlib
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from .constants import CATEGORIES

_SAFE_ID = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
# Every output path holds an id, and a file name has at most 255 bytes: a slug longer than
# MAX_SLUG keeps a readable prefix and a hash of the whole text (stable across runs).
MAX_SLUG = 64
MAX_ID = 100


class SheetError(ValueError):
    """A bad concept sheet; the message names the line and the problem."""


@dataclass(frozen=True)
class Concept:
    id: str  # path-safe slug, used in every output path
    text: str  # display and prompt text, kept as written
    category: str


def slugify(text: str) -> str:
    """Path-safe ASCII slug: `bat (animal)` -> `bat-animal`, `Beyoncé` -> `beyonce`; a long
    text -> its first words and the first 8 hex digits of the whole text's sha256."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    if len(slug) <= MAX_SLUG:
        return slug
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]
    head = slug[: MAX_SLUG - len(digest) - 1]
    head = head.rsplit("-", 1)[0] if "-" in head else head  # at a word boundary
    return f"{head}-{digest}"


def load_sheet(path: str | Path) -> list[Concept]:
    """Read and validate a tab-separated sheet with columns concept, category and optional id."""
    path = Path(path)
    if not path.is_file():
        raise SheetError(f"{path}: concept sheet not found")
    # utf-8-sig: a sheet saved by Excel starts with a byte-order mark.
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        fields = reader.fieldnames or []
        missing = [c for c in ("concept", "category") if c not in fields]
        if missing and len(fields) == 1 and "," in fields[0]:
            raise SheetError(
                f"{path}: the sheet must be tab-separated (this one looks comma-separated)"
            )
        if missing:
            raise SheetError(f"{path}: missing column(s) {', '.join(missing)} in the header")
        unknown = [c for c in fields if c not in ("concept", "category", "id")]
        if unknown:
            raise SheetError(f"{path}: unknown column(s) {', '.join(unknown)} in the header")
        concepts: list[Concept] = []
        seen_text: dict[str, int] = {}
        seen_id: dict[str, int] = {}
        for line, row in enumerate(reader, start=2):
            where = f"{path}:{line}"
            text = (row.get("concept") or "").strip()
            category = (row.get("category") or "").strip()
            given_id = (row.get("id") or "").strip()
            if not text:
                raise SheetError(f"{where}: empty concept text")
            if category not in CATEGORIES:
                raise SheetError(
                    f"{where}: unknown category {category!r} for {text!r} "
                    f"(expected one of {', '.join(CATEGORIES)})"
                )
            concept_id = given_id or slugify(text)
            if not concept_id:
                raise SheetError(
                    f"{where}: {text!r} has no ASCII letters or digits to make an id from: give "
                    f"the row an id in the sheet's optional `id` column, e.g. "
                    f"{text}\t{category}\tpanda (lowercase letters, digits, '-', '_')"
                )
            if not _SAFE_ID.match(concept_id) or len(concept_id) > MAX_ID:
                raise SheetError(
                    f"{where}: id {concept_id!r} of {text!r} is not path-safe "
                    f"(lowercase letters, digits, '-' and '_' only, at most {MAX_ID} characters)"
                )
            key = text.casefold()
            if key in seen_text:
                raise SheetError(
                    f"{where}: duplicate concept {text!r} (first on line {seen_text[key]})"
                )
            if concept_id in seen_id:
                raise SheetError(
                    f"{where}: duplicate id {concept_id!r} for {text!r} "
                    f"(first on line {seen_id[concept_id]})"
                )
            seen_text[key], seen_id[concept_id] = line, line
            concepts.append(Concept(id=concept_id, text=text, category=category))
    if not concepts:
        raise SheetError(f"{path}: the sheet has no concepts")
    return concepts
