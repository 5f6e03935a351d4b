"""Labelled renders for the judge audit in the toy world (no trained CLIP there): for each of
a concept's groups, renders of the shape the prompt names (the judge should say yes) and of
another shape (it should say no), asked exactly as the concept's images are."""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd
from PIL import Image

from crce.judge import judge_question
from crce.seeds import derive_seed
from crce.settings import AuditSettings

from .world import render, shape_of, shapes


def labelled_renders(
    split, category: str, settings: AuditSettings, retain_question: str, folder: Path
) -> pd.DataFrame:
    """A manifest of renders with a `truth` column (does the image show what is asked?), the
    question read as the judge will ask it (`judge.retain_question`)."""
    rng = random.Random(derive_seed("crce-audit-renders", settings.seed, split.id))
    prompts = split.prompts()
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(settings.renders):
        group, prompt = prompts[k % len(prompts)]
        question = judge_question(group, prompt, split.concept, retain_question)
        asked = shape_of(question)
        truth = k % 2 == 0  # half show the asked shape, half another one
        shown = asked if truth else rng.choice([s for s in shapes() if s != asked])
        colour = rng.choice(["red", "green", "blue", "orange", "purple"])
        path = folder / f"{k:05d}.png"
        Image.fromarray(render(shown, colour, rng)).save(path)
        rows.append({
            "method": "renders", "concept": split.id, "concept_text": split.concept,
            "category": category, "group": group, "prompt": prompt, "image_index": k,
            "seed": k, "path": str(path), "truth": "yes" if truth else "no",
        })  # fmt: skip
    return pd.DataFrame(rows)
