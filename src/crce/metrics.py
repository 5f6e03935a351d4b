"""Metrics (long table), Table 1 in the paper's layout, and the comparison with the paper."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from .constants import ANSWERS, CATEGORIES, METRICS
from .paper import PAPER_TABLE1, PAPER_TABLE2

# The paper's Table 1 row order; labels come from each method's config.
PAPER_ORDER = tuple(PAPER_TABLE1)


def wilson(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def compute_metrics(judgments: pd.DataFrame, labels: dict[str, str]) -> pd.DataFrame:
    """One row per (method, concept, group): accuracy = share of 'yes' among the readable
    answers; answers the judge left unreadable are counted apart (`n_invalid`), not dropped."""
    rows = []
    keys = ["method", "concept", "category", "group"]
    for (method, concept, category, group), frame in judgments.groupby(keys, sort=False):
        valid = frame[frame["answer"].isin(ANSWERS)]
        yes = int((valid["answer"] == "yes").sum())
        n = len(valid)
        low, high = wilson(yes, n)
        rows.append(
            {
                "method": method,
                "label": labels.get(method, method),
                "concept": concept,
                "category": category,
                "group": group,
                "metric": METRICS[group],
                "n": n,
                "n_invalid": len(frame) - n,
                "accuracy": yes / n if n else math.nan,
                "ci_low": low,
                "ci_high": high,
                "mean_p_yes": float(valid["p_yes"].mean()),
            }
        )
    return pd.DataFrame(rows)


def method_order(methods: list[str], labels: dict[str, str]) -> list[str]:
    """The paper's rows first, in its order; other methods follow in config order."""
    rank = {label: i for i, label in enumerate(PAPER_ORDER)}
    known = sorted((m for m in methods if labels[m] in rank), key=lambda m: rank[labels[m]])
    return known + [m for m in methods if labels[m] not in rank]


def categories_in(frame: pd.DataFrame) -> list[str]:
    """The categories `frame` has, in Table 1's order."""
    return [c for c in CATEGORIES if c in set(frame["category"])]


def category_means(metrics: pd.DataFrame) -> pd.Series:
    """Table 1's cells: accuracy in %, averaged over each category's concepts, by (method,
    category, metric)."""
    return metrics.groupby(["method", "category", "metric"])["accuracy"].mean() * 100


def table1(metrics: pd.DataFrame, methods: list[str], labels: dict[str, str]) -> pd.DataFrame:
    """Rows = methods; columns `{category}/{metric}`: mean over the category's concepts, in %."""
    categories = categories_in(metrics)
    means = category_means(metrics)
    rows = []
    for method in method_order(methods, labels):
        row = {"method": labels[method]}
        for category in categories:
            for metric in METRICS.values():
                value = means.get((method, category, metric), math.nan)
                row[f"{category}/{metric}"] = round(float(value), 2)
        rows.append(row)
    return pd.DataFrame(rows)


def versus_paper(table: pd.DataFrame) -> pd.DataFrame:
    """Our Table 1 beside the paper's, for the methods and categories both have."""
    rows = []
    for _, row in table.iterrows():
        paper = PAPER_TABLE1.get(row["method"])
        if not paper:
            continue
        for category, values in paper.items():
            for metric, theirs in zip(METRICS.values(), values, strict=True):
                column = f"{category}/{metric}"
                if column in row:
                    ours = row[column]
                    rows.append(
                        {
                            "method": row["method"],
                            "category": category,
                            "metric": metric,
                            "ours": ours,
                            "paper": theirs,
                            "difference": round(ours - theirs, 2),
                        }
                    )
    columns = ["method", "category", "metric", "ours", "paper", "difference"]
    return pd.DataFrame(rows, columns=columns)


def markdown(table: pd.DataFrame) -> str:
    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = [
        "| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row) + " |"
        for row in table.itertuples(index=False)
    ]
    return "\n".join([header, rule, *body]) + "\n"


def run(
    *,
    judgments: list[str],
    labels: dict[str, str],
    metrics_out: str,
    table_out: str,
    markdown_out: str,
    paper_out: str,
    invalid_out: str,
) -> None:
    """The `metrics` rule: inputs are exactly the configured methods x the sheet's concepts;
    `labels` maps each method to its Table 1 row label, in config order."""
    frames = pd.concat([pd.read_parquet(p) for p in judgments], ignore_index=True)
    metrics = compute_metrics(frames, labels)
    Path(metrics_out).parent.mkdir(parents=True, exist_ok=True)
    metrics.to_parquet(metrics_out, index=False)
    table = table1(metrics, list(labels), labels)
    table.to_csv(table_out, index=False, float_format="%.2f")
    invalid = invalid_answers(metrics, labels)
    note = ""
    if invalid["invalid"].sum():
        worst = invalid.sort_values("share", ascending=False).iloc[0]
        note = (f"\nUnreadable judge answers (after one re-ask; not in the accuracies): "
                f"{int(invalid['invalid'].sum())} in all, most for {worst['method']} "
                f"({worst['category']}: {worst['share']:.1%}); results/judge_invalid.csv.\n")  # fmt: skip
    Path(markdown_out).write_text(markdown(table) + note)
    versus_paper(table).to_csv(paper_out, index=False, float_format="%.2f")
    invalid.to_csv(invalid_out, index=False, float_format="%.4f")


def invalid_answers(metrics: pd.DataFrame, labels: dict[str, str]) -> pd.DataFrame:
    """Per method and category: images judged, answers left unreadable, and their share."""
    counts = metrics.groupby(["method", "category"])[["n", "n_invalid"]].sum().reset_index()
    images = counts["n"] + counts["n_invalid"]
    return pd.DataFrame(
        {
            "method": counts["method"].map(labels),
            "category": counts["category"],
            "images": images,
            "invalid": counts["n_invalid"],
            "share": counts["n_invalid"] / images,
        }
    )


def table2_versus_paper(distances: pd.DataFrame, concept: str) -> pd.DataFrame:
    """Our Table 2 beside the paper's, item by item (an item only one side has: NaN)."""
    paper = PAPER_TABLE2[concept]
    ours = {r.text: r for r in distances.itertuples()}
    rows = []
    for kind, items in paper.items():
        for text, (cos, euc) in items.items():
            row = ours.get(text)
            rows.append(
                {
                    "kind": kind,
                    "text": text,
                    "cosine": row.cosine if row else math.nan,
                    "paper_cosine": cos,
                    "euclidean": row.euclidean if row else math.nan,
                    "paper_euclidean": euc,
                }
            )
    for text, row in ours.items():
        kind = row.group.split("_")[0]
        if text not in paper["coref"] and text not in paper["retain"]:
            rows.append({"kind": kind, "text": text, "cosine": row.cosine, "paper_cosine": math.nan,
                         "euclidean": row.euclidean, "paper_euclidean": math.nan})  # fmt: skip
    return pd.DataFrame(rows)


def run_table2_versus_paper(*, distances: str, concept: str, output: str) -> None:
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    table = table2_versus_paper(pd.read_csv(distances), concept)
    table.to_csv(output, index=False, float_format="%.4f")


def table6(judgments: pd.DataFrame, cells: dict[str, tuple[int, int]]) -> pd.DataFrame:
    """Paper Table 6: one row per (M, N, category) with the five metrics, in percent (means
    over the category's concepts, as Table 1)."""
    metrics = compute_metrics(judgments, {m: m for m in cells})
    means = category_means(metrics)
    rows = []
    for method, (m, n) in cells.items():
        for category in categories_in(metrics):
            row = {"M": m, "N": n, "category": category}
            for metric in METRICS.values():
                row[metric] = round(float(means.get((method, category, metric), math.nan)), 2)
            rows.append(row)
    return pd.DataFrame(rows).sort_values(["category", "M", "N"], ignore_index=True)


def run_table6(judgments: list[str], cells: dict[str, list[int]], output: str) -> None:
    frames = pd.concat([pd.read_parquet(p) for p in judgments], ignore_index=True)
    table = table6(frames, {m: tuple(mn) for m, mn in cells.items()})
    table.to_csv(output, index=False, float_format="%.2f")


def retains_by_distance(
    judgments: pd.DataFrame, distances: pd.DataFrame, labels: dict[str, str]
) -> pd.DataFrame:
    """Acc_R apart for a concept's close and far retains: "close" are the retains nearer the
    target than the median of its retains in the text space (Table 2's pooled cosine), so the
    same split works for dog and cat at paper scale and for the toy world's oval and circle.
    Per method and category: means over concepts, in percent, as Table 1."""
    retains = distances[distances["group"].str.startswith("retain")].copy()
    median = retains.groupby("id")["cosine"].transform("median")
    retains["closeness"] = (retains["cosine"] > median).map({True: "close", False: "far"})
    judged = judgments[judgments["group"].str.startswith("retain")]
    judged = judged[judged["answer"].isin(ANSWERS)].merge(
        retains[["id", "text", "closeness"]],
        left_on=["concept", "prompt"],
        right_on=["id", "text"],
        how="inner",
    )
    judged["yes"] = judged["answer"] == "yes"
    per_concept = judged.groupby(["method", "concept", "category", "closeness"])["yes"].mean()
    means = (per_concept.groupby(["method", "category", "closeness"]).mean() * 100).round(2)
    counts = judged.groupby(["method", "category", "closeness"]).size()
    rows = []
    for method in method_order(list(labels), labels):
        for category in categories_in(judged):
            close = means.get((method, category, "close"), math.nan)
            far = means.get((method, category, "far"), math.nan)
            rows.append(
                {
                    "method": labels[method],
                    "category": category,
                    "Acc_R_close": close,
                    "Acc_R_far": far,
                    "close_minus_far": round(close - far, 2),
                    "images_close": int(counts.get((method, category, "close"), 0)),
                    "images_far": int(counts.get((method, category, "far"), 0)),
                }
            )
    return pd.DataFrame(rows)


def run_retains_by_distance(
    *, judgments: list[str], distances: list[str], labels: dict[str, str], output: str
) -> None:
    frames = pd.concat([pd.read_parquet(p) for p in judgments], ignore_index=True)
    table = pd.concat([pd.read_csv(p) for p in distances], ignore_index=True)
    retains_by_distance(frames, table, labels).to_csv(output, index=False, float_format="%.2f")


def robustness_table(judgments: pd.DataFrame, metrics: pd.DataFrame, labels: dict) -> pd.DataFrame:
    """Acc_P per method, category and prompt kind (and all kinds), beside Acc_U; in percent,
    means over concepts as Table 1, with the pooled 95% Wilson interval and n."""
    valid = judgments[judgments["answer"].isin(ANSWERS)].assign(yes=lambda f: f["answer"] == "yes")
    means = category_means(metrics)
    rows = []
    for method in method_order([m for m in labels if m in set(valid["method"])], labels):
        for category in categories_in(valid):
            mine = valid[(valid["method"] == method) & (valid["category"] == category)]
            for kind in [*sorted(set(mine["group"])), "all"]:
                part = mine if kind == "all" else mine[mine["group"] == kind]
                low, high = wilson(int(part["yes"].sum()), len(part))
                rows.append({
                    "method": labels[method], "category": category, "prompts": kind,
                    "Acc_P": round(part.groupby("concept")["yes"].mean().mean() * 100, 2),
                    "n": len(part), "ci_low": round(low * 100, 2), "ci_high": round(high * 100, 2),
                    "Acc_U": round(float(means.get((method, category, "Acc_U"), math.nan)), 2),
                })  # fmt: skip
    return pd.DataFrame(rows)


def run_robustness_table(*, judgments, metrics, labels, output):
    frame = pd.concat([pd.read_parquet(p) for p in judgments], ignore_index=True)
    table = robustness_table(frame, pd.read_parquet(metrics), labels)
    table.to_csv(output, index=False, float_format="%.2f")
