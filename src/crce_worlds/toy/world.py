"""Rendering, captions and the ontology of the toy shapes world."""

from __future__ import annotations

import json
import math
import random
import re
from functools import lru_cache
from importlib import resources

import numpy as np
from PIL import Image, ImageDraw

from crce.lists import Certainty, ConceptLists, Item, Provenance

SCALE = 4  # draw at 4x, then downsample: smooth edges


@lru_cache(maxsize=1)
def ontology() -> dict:
    return json.loads(resources.files(__package__).joinpath("ontology.json").read_text())


def shapes() -> list[str]:
    return list(ontology()["shapes"])


def colours() -> list[str]:
    return list(ontology()["colours"])


def vocabulary() -> list[str]:
    words = {"a"} | set(colours())
    for spec in ontology()["shapes"].values():
        for name in spec["names"]:
            words |= set(name.split())
    return sorted(words)


def shape_of(text: str) -> str | None:
    """The shape a phrase names (longest name wins: 'plus sign' before 'plus')."""
    words = " " + re.sub(r"[^a-z]+", " ", text.lower()) + " "  # punctuation is no word
    best = None
    for shape, spec in ontology()["shapes"].items():
        for name in spec["names"]:
            if f" {name} " in words and (best is None or len(name) > len(best[1])):
                best = (shape, name)
    return best[0] if best else None


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def rot(points):
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]

    if kind == "square":
        k = r * 0.8
        return rot([(-k, -k), (k, -k), (k, k), (-k, k)])
    if kind == "diamond":  # a rhombus standing on a corner: taller than wide, not a square
        return rot([(0, -r), (r * 0.7, 0), (0, r), (-r * 0.7, 0)])
    if kind == "oval":  # an ellipse lying down, half as tall as wide
        steps = [2 * math.pi * i / 64 for i in range(64)]
        return rot([(r * math.cos(t), r * 0.55 * math.sin(t)) for t in steps])
    if kind == "triangle":
        return rot(
            [
                (r * math.cos(a), r * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
            ]
        )
    if kind == "star":
        pts = []
        for i in range(10):
            radius = r if i % 2 == 0 else r * 0.42
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((radius * math.cos(a), radius * math.sin(a)))
        return rot(pts)
    if kind == "cross":
        w, k = r * 0.33, r
        return rot([(-w, -k), (w, -k), (w, -w), (k, -w), (k, w), (w, w), (w, k), (-w, k),
                    (-w, w), (-k, w), (-k, -w), (-w, -w)])  # fmt: skip
    if kind == "heart":
        pts = []
        for i in range(64):
            t = 2 * math.pi * i / 64
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            pts.append((x * r / 17, y * r / 17 - r * 0.05))
        return rot(pts)
    raise ValueError(kind)


def render(shape: str, colour: str, rng: random.Random) -> np.ndarray:
    """One filled shape on white, random position, size, rotation and colour jitter (uint8 HWC)."""
    size = ontology()["image_size"]
    big = size * SCALE
    image = Image.new("RGB", (big, big), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    cx = big / 2 + rng.uniform(-0.07, 0.07) * big
    cy = big / 2 + rng.uniform(-0.07, 0.07) * big
    r = rng.uniform(0.28, 0.36) * big
    angle = math.radians(rng.uniform(-10, 10))
    base = ontology()["colours"][colour]
    fill = tuple(int(min(255, max(0, c + rng.randint(-25, 25)))) for c in base)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=fill)
    return np.asarray(image.resize((size, size), Image.LANCZOS))


def relatives(shape: str) -> list[str]:
    """The shapes close to `shape`: its `relative`, and the shapes whose relative it is."""
    specs = ontology()["shapes"]
    return [
        other
        for other, spec in specs.items()
        if other != shape
        and (spec.get("relative") == shape or specs[shape].get("relative") == other)
    ]


def held_out_pairs() -> set[tuple[str, str]]:
    return {(c, n) for spec in ontology()["shapes"].values() for c, n in spec["held_out"]}


def caption(shape: str, colour: str, rng: random.Random) -> str:
    """A training caption; held-out (colour, name) pairs never appear."""
    names = ontology()["shapes"][shape]["names"]
    templates = ontology()["caption_templates"]
    while True:
        name = rng.choice(names)
        template = rng.choices([t for t, _ in templates], weights=[w for _, w in templates])[0]
        if "{c}" in template and (colour, name) in held_out_pairs():
            continue
        return template.format(w=name, c=colour)


def dataset(n: int, seed: int) -> tuple[np.ndarray, list[str], list[int]]:
    rng = random.Random(seed)
    images, captions, labels = [], [], []
    for _ in range(n):
        shape = rng.choice(shapes())
        colour = rng.choice(colours())
        images.append(render(shape, colour, rng))
        captions.append(caption(shape, colour, rng))
        labels.append(shapes().index(shape))
    return np.stack(images), captions, labels


LEVELS = [Certainty.very_high] * 2 + [Certainty.high] * 4 + [Certainty.normal] * 3
LEVELS += [Certainty.low] * 3 + [Certainty.very_low] * 3


def concept_lists(concept: str) -> dict:
    """The 15 corefs and 15 retains of a toy concept, most certain first (the LLM's answer)."""
    spec = ontology()["shapes"].get(concept)
    if spec is None:
        raise KeyError(f"{concept!r} is not a toy concept (one of {', '.join(shapes())})")
    names = spec["names"]
    held = [f"{c} {n}" for c, n in spec["held_out"]]
    seen = [f"{c} {n}" for c in colours() for n in names[1:] if (c, n) not in held_out_pairs()]
    corefs = names[1:] + [f"a {n}" for n in names[1:]] + seen[:4] + held
    # Retains, most certain first: the close relatives (oval for circle), by two names and in
    # two colours, as an LLM would list them, then the other shapes and their second names.
    close = relatives(concept)
    near = [n for r in close for n in ontology()["shapes"][r]["names"][:2]]
    near += [f"{colours()[i % 5]} {r}" for i, r in enumerate(close * 2)]
    others = [s for s in shapes() if s != concept and s not in close]
    far = others + [ontology()["shapes"][s]["names"][1] for s in others]
    far += [f"{colours()[i % 5]} {s}" for i, s in enumerate(others)]
    retains = (near + far)[: len(LEVELS)]
    return {
        "corefs": [
            {"text": t, "certainty": lv.value} for t, lv in zip(corefs, LEVELS, strict=True)
        ],
        "retains": [
            {"text": t, "certainty": lv.value} for t, lv in zip(retains, LEVELS, strict=True)
        ],
    }


def concept_pairs(concept: str, n: int) -> list[list[str]]:
    """Prompt pairs that differ by the concept alone, in the toy's caption forms."""
    forms = [(f"a {c} {concept}", f"a {c}") for c in colours()]
    forms += [(f"{c} {concept}", c) for c in colours()]
    return [list(pair) for pair in forms[:n]]


def as_lists(concept: str, concept_id: str) -> ConceptLists:
    data = concept_lists(concept)
    return ConceptLists(
        concept=concept,
        id=concept_id,
        category="object",
        corefs=[Item(**i) for i in data["corefs"]],
        retains=[Item(**i) for i in data["retains"]],
        provenance=Provenance(source="toy"),
    )
