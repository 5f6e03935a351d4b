"""How far to trust the judge (the `judge_audit` target).

A second, independent judge on the same images: a CLIP zero-shot classifier, no server. Its
label set is the concept's target and its retains; an image answers "yes" when the label it
was asked about wins (the target for target and coref images, the retain's own text for a
retain image), so a coref image is never scored against its own synonyms. Agreement and
Cohen's kappa between the two judges per (category, group). In the toy world, where no
trained CLIP exists, the reference is the ground truth of labelled renders instead: the
judge's accuracy (and kappa) against it.

An audit sheet for people: N images per concept drawn reproducibly, an HTML page with both
judges' answers, and the same rows in a CSV with an empty `human` column; once filled,

    python -m crce.audit score results/audit/sheet.csv

reports each judge's accuracy and kappa against the humans.
"""

from __future__ import annotations

import argparse
import html
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from .constants import ANSWERS
from .lists import Split
from .seeds import derive_seed
from .settings import AuditSettings
from .stats import agreement, cohen_kappa

COLUMNS = ["method", "concept", "category", "group", "prompt", "question", "image_index", "path"]


def clip_answers(images: pd.DataFrame, split: Split, encoder, template: str) -> pd.Series:
    """yes when the asked label wins among the target and the concept's retains."""
    labels = [split.concept, *(item.text for _, item in split.items("retain"))]
    labels = list(dict.fromkeys(labels))
    texts = encoder.texts([template.format(label) for label in labels])
    features = encoder.images(list(images["path"]))
    winners = np.asarray(labels)[(features @ texts.T).argmax(axis=1)]
    return pd.Series(
        np.where(winners == images["question"].to_numpy(), "yes", "no"), index=images.index
    )


def second_opinion_clip(*, judgments, split_path, features, runtime, template, output):
    """The `audit_second` rule (clip): the VLM judge's answers beside CLIP's."""
    from .lists import read_split
    from .vision import encoder

    split = read_split(split_path)
    judged = pd.concat([pd.read_parquet(p) for p in judgments], ignore_index=True)
    images = judged[judged["answer"].isin(ANSWERS)].copy()
    images["second"] = clip_answers(images, split, encoder(features, runtime), template)
    images = images.rename(columns={"answer": "judge"}).assign(reference="clip")
    images[[*COLUMNS, "judge", "second", "reference"]].to_parquet(output, index=False)


def second_opinion_renders(
    *, split_path, settings, judge_settings, judge_runtime, category, cache, output, server_log
):
    """The `audit_second` rule with a renders judge (`audit.second_judge: module:function`,
    the toy world's labelled renders): the judge asked about images whose truth is known,
    its answers beside the ground truth. The function takes (split, category, settings,
    retain_question, folder) and returns a manifest with a `truth` column (yes / no)."""
    from .judge import judge_manifests
    from .lists import read_split
    from .plugins import load_object

    labelled_renders = load_object(settings.second_judge, "second judge")
    split = read_split(split_path)
    folder = Path(output).with_suffix("")
    renders = labelled_renders(split, category, settings, judge_settings.retain_question, folder)
    renders.drop(columns="truth").to_parquet(folder / "manifest.parquet", index=False)
    judge_manifests({"renders": str(folder / "manifest.parquet")},
                    {"renders": str(folder / "renders.parquet")},
                    settings=judge_settings, runtime=judge_runtime, cache_path=cache,
                    server_log=server_log, progress=False)  # fmt: skip
    judged = pd.read_parquet(folder / "renders.parquet")
    rows = judged.assign(second=renders["truth"].to_numpy(), reference="truth")
    rows = rows[rows["answer"].isin(ANSWERS)].rename(columns={"answer": "judge"})
    rows[[*COLUMNS, "judge", "second", "reference"]].to_parquet(output, index=False)


def agreement_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (category, group): n, raw agreement and Cohen's kappa between the judge and the
    second opinion, and each one's share of yes."""
    out = []
    for (category, group), frame in rows.groupby(["category", "group"]):
        out.append({
            "category": category, "group": group, "reference": frame["reference"].iloc[0],
            "n": len(frame), "agreement": round(agreement(frame["judge"], frame["second"]), 4),
            "kappa": round(cohen_kappa(list(frame["judge"]), list(frame["second"])), 4),
            "judge_yes": round((frame["judge"] == "yes").mean(), 4),
            "reference_yes": round((frame["second"] == "yes").mean(), 4),
        })  # fmt: skip
    return pd.DataFrame(out)


def audit_sheet(rows: pd.DataFrame, settings: AuditSettings) -> pd.DataFrame:
    """N images per concept, drawn reproducibly, with both answers and an empty `human`."""
    picks = []
    for concept, frame in rows.groupby("concept", sort=True):
        rng = np.random.default_rng(derive_seed("crce-audit", settings.seed, concept) % 2**32)
        take = rng.choice(len(frame), size=min(settings.per_concept, len(frame)), replace=False)
        picks.append(frame.iloc[np.sort(take)])
    sheet = pd.concat(picks, ignore_index=True)
    return sheet[[*COLUMNS, "judge", "second", "reference"]].assign(human="")


def write_html(sheet: pd.DataFrame, output: str | Path) -> None:
    folder = Path(output).parent
    cells = []
    for row in sheet.itertuples():
        src = html.escape(os.path.relpath(row.path, folder))
        cells.append(
            f"<figure><img src='{src}' width=160><figcaption><b>{html.escape(row.question)}"
            f"</b>?<br>{html.escape(row.method)} · {html.escape(row.group)}<br>judge: "
            f"{row.judge} · {row.reference}: {row.second}</figcaption></figure>"
        )
    page = (
        "<!doctype html><meta charset=utf-8><title>Judge audit</title><style>figure"
        "{display:inline-block;margin:6px;font:12px sans-serif;width:170px}</style>"
        "<h1>Judge audit</h1><p>Does the image show the concept in bold? Fill the "
        "<code>human</code> column of sheet.csv (yes / no), then run <code>python -m "
        "crce.audit score sheet.csv</code>.</p>" + "".join(cells)
    )
    Path(output).write_text(page, encoding="utf-8")


def run_audit(*, rows: list[str], settings: dict, table: str, sheet: str, page: str) -> None:
    """The `judge_audit` rule."""
    frame = pd.concat([pd.read_parquet(p) for p in rows], ignore_index=True)
    agreement_table(frame).to_csv(table, index=False)
    Path(sheet).parent.mkdir(parents=True, exist_ok=True)
    picked = audit_sheet(frame, AuditSettings(**settings))
    picked.to_csv(sheet, index=False)
    write_html(picked, page)


def score_humans(sheet: pd.DataFrame) -> dict:
    """Each judge's accuracy and kappa against the humans' answers (rows they filled)."""
    filled = sheet[sheet["human"].astype(str).str.strip().str.lower().isin(ANSWERS)]
    human = list(filled["human"].str.strip().str.lower())
    if not human:
        raise ValueError("no row of the sheet has a human answer (yes or no) yet")
    return {
        judge: {
            "n": len(human),
            "accuracy": round(agreement(list(filled[column]), human), 4),
            "kappa": round(cohen_kappa(list(filled[column]), human), 4),
        }
        for judge, column in (("judge", "judge"), (filled["reference"].iloc[0], "second"))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Score the judges against a filled audit sheet.")
    parser.add_argument("command", choices=["score"])
    parser.add_argument("sheet")
    args = parser.parse_args()
    print(json.dumps(score_humans(pd.read_csv(args.sheet, keep_default_na=False)), indent=2))


if __name__ == "__main__":
    main()
