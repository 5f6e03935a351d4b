"""How far fp32 rounding alone moves a trained delta on the tiny model: the same separate run
on 1 and on 2 threads, against a grouped run of the five methods (tests/test_erase.py's
fp32 tolerance rests on this).

    python bench/fp32_floor.py --iterations 4

Prints, per method, the relative difference of the change (trained - base tensors) between
the separate run on 2 threads and on 1 thread, and between the grouped and the separate run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from helpers import make_cat_split  # noqa: E402
from test_erase import group_settings, rel, trained_changes  # noqa: E402

from crce_worlds.tiny import build_tiny_pipeline  # noqa: E402


def changes(model, settings, methods):
    """The measurement test_erase's fp32 tolerance is checked with, not a copy of it."""
    return trained_changes(torch.float32, model, make_cat_split(), settings, methods)[0]


def worst(a, b):
    return max(rel(a[n], b[n]) for n in a)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=4)
    args = parser.parse_args()
    settings = group_settings(iterations=args.iterations)
    with tempfile.TemporaryDirectory() as tmp:
        model = str(build_tiny_pipeline(Path(tmp) / "tiny"))
        torch.set_num_threads(2)
        grouped = changes(model, settings, list(settings))
        two = {m: changes(model, settings, [m])[m] for m in settings}
        torch.set_num_threads(1)
        one = {m: changes(model, settings, [m])[m] for m in settings}
    for m in settings:
        row = {
            "method": m,
            "iterations": args.iterations,
            "separate_2_vs_1_thread": worst(two[m], one[m]),
            "grouped_vs_separate": worst(grouped[m], two[m]),
        }
        print(json.dumps(row))


if __name__ == "__main__":
    main()
