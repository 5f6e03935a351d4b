"""The paper's two claims, read off a finished toy run (`snakemake table1
--configfile=config/demo.yaml` in WORK): corefs left by ESD-x that CRCE erases, and close
retains over-erased by ESD-x that CRCE holds. "Close" here is the toy ontology's relatives
(oval for circle, diamond for square); results/retains_by_distance.csv has the pipeline's
generic split (nearer the target than the median retain in Table 2's text space).

    python bench/toy_claims.py WORK [WORK ...]     # one finished run per erasure seed
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

import pandas as pd

from crce_worlds.toy import world


def claims(work: Path) -> dict:
    judged = pd.concat(
        [pd.read_parquet(p) for p in glob.glob(f"{work}/results/judgments/*/*.parquet")]
    )
    judged = judged[judged["answer"].isin(["yes", "no"])].assign(yes=lambda f: f["answer"] == "yes")
    retain = judged[judged["group"].str.startswith("retain")].copy()
    retain["close"] = [world.shape_of(p) in world.relatives(c)
                       for p, c in zip(retain["prompt"], retain["concept_text"], strict=True)]  # fmt: skip
    out = {}
    for method, frame in judged.groupby("method"):
        mine = retain[retain["method"] == method]
        out[method] = {
            "corefs": round(frame[frame["group"].str.startswith("coref")]["yes"].mean() * 100, 1),
            "close_retains": round(mine[mine["close"]]["yes"].mean() * 100, 1),
            "far_retains": round(mine[~mine["close"]]["yes"].mean() * 100, 1),
            "close_by_concept": {
                c: round(f["yes"].mean() * 100, 1)
                for c, f in mine[mine["close"]].groupby("concept")
            },
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("work", nargs="+")
    for work in parser.parse_args().work:
        print(json.dumps({"run": work, **claims(Path(work))}))


if __name__ == "__main__":
    main()
