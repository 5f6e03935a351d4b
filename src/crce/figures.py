"""Figures: a per-concept image grid (paper Fig. 1/5) and a bar chart per category."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from .manifests import read_manifest  # noqa: E402
from .metrics import METRICS, method_order  # noqa: E402

GRID_COLUMNS = (("target", 1), ("coref_test", 2), ("retain_test", 2))


def concept_grid(manifests: list[str], labels: dict[str, str], output: str) -> None:
    """Rows = methods; columns = target, two corefs, two retains; the same seed down a column."""
    frames = {m: read_manifest(m) for m in manifests}
    methods = {frame["method"].iloc[0]: frame for frame in frames.values()}
    order = method_order(list(methods), labels)
    first = methods[order[0]]
    columns = []
    for group, count in GRID_COLUMNS:
        prompts = first[first["group"] == group]["prompt"].drop_duplicates().tolist()[:count]
        columns += [(group, p) for p in prompts]
    fig, axes = plt.subplots(
        len(order), len(columns), figsize=(2 * len(columns), 2 * len(order)), squeeze=False
    )
    for r, method in enumerate(order):
        frame = methods[method]
        for c, (group, prompt) in enumerate(columns):
            ax = axes[r][c]
            row = frame[(frame["prompt"] == prompt) & (frame["image_index"] == 0)].iloc[0]
            ax.imshow(Image.open(row["path"]))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{group}\n{prompt}"[:48], fontsize=7)
            if c == 0:
                ax.set_ylabel(labels.get(method, method), fontsize=8)
    fig.suptitle(first["concept_text"].iloc[0])
    fig.tight_layout()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)


def category_bars(metrics_path: str, labels: dict[str, str], category: str, output: str) -> None:
    metrics = pd.read_parquet(metrics_path)
    metrics = metrics[metrics["category"] == category]
    means = metrics.groupby(["method", "metric"])["accuracy"].mean() * 100
    order = method_order(list(labels), labels)
    names = list(METRICS.values())
    width = 0.8 / max(1, len(order))
    fig, ax = plt.subplots(figsize=(9, 3.5))
    for k, method in enumerate(order):
        values = [means.get((method, m), float("nan")) for m in names]
        ax.bar([i + k * width for i in range(len(names))], values, width, label=labels[method])
    ax.set_xticks([i + width * (len(order) - 1) / 2 for i in range(len(names))], names)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{category}: U and C lower is better, R higher is better")
    ax.legend(fontsize=7, ncols=min(4, len(order)))
    fig.tight_layout()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)


def table6_heatmap(table_path: str, metric: str, output: str) -> None:
    """One metric of Table 6 over the (M, N) grid, a panel per category."""
    table = pd.read_csv(table_path)
    categories = list(dict.fromkeys(table["category"]))
    fig, axes = plt.subplots(
        1, len(categories), figsize=(3.6 * len(categories), 3.2), squeeze=False
    )
    for ax, category in zip(axes[0], categories, strict=True):
        grid = table[table["category"] == category].pivot(index="M", columns="N", values=metric)
        image = ax.imshow(grid.to_numpy(), cmap="viridis", vmin=0, vmax=100)
        ax.set_xticks(range(len(grid.columns)), grid.columns)
        ax.set_yticks(range(len(grid.index)), grid.index)
        ax.set_xlabel("N (retains)")
        ax.set_ylabel("M (corefs)")
        ax.set_title(f"{category}: {metric}")
        for (i, j), value in np.ndenumerate(grid.to_numpy()):
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", color="w", fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)


def quality_bars(table: pd.DataFrame, output: str) -> None:
    """One panel per quality metric: a bar per method (and scope), with its spread."""
    metrics = list(dict.fromkeys(table["metric"])) or ["(none)"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        rows = table[table["metric"] == metric]
        names = [
            f"{m}\n{s}" if s != "coco" else m
            for m, s in zip(rows["method"], rows["scope"], strict=True)
        ]
        ax.bar(range(len(rows)), rows["value"], yerr=rows["spread"].fillna(0), capsize=3)
        ax.set_xticks(range(len(rows)), names, rotation=60, fontsize=6)
        ax.set_title(metric, fontsize=9)
    fig.tight_layout()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)


def attack_figure(table_path: str, category: str, output: str) -> None:
    """Per attack, pre-ASR and ASR of each method pooled over the category's concepts, with
    their 95% intervals (results/attacks.csv's `all` rows)."""
    table = pd.read_csv(table_path)
    pooled = table[(table["concept"] == "all") & (table["category"] == category)]
    attacks = list(dict.fromkeys(pooled["attack"])) or ["(none)"]
    fig, axes = plt.subplots(1, len(attacks), figsize=(max(4.5, 0.6 * len(pooled) + 2) * len(attacks),
                             3.4), squeeze=False)  # fmt: skip
    for ax, attack in zip(axes[0], attacks, strict=True):
        rows = pooled[pooled["attack"] == attack]
        x = np.arange(len(rows))
        for shift, name, label in ((-0.2, "pre_asr", "pre-ASR (unattacked)"), (0.2, "asr", "ASR")):
            values = rows[name].to_numpy(float)
            errors = [values - rows[f"{name}_low"].to_numpy(float),
                      rows[f"{name}_high"].to_numpy(float) - values]  # fmt: skip
            ax.bar(x + shift, values, 0.4, yerr=errors, capsize=2, label=label)
        ax.set_xticks(x, rows["method"], rotation=45, ha="right", fontsize=7)
        ax.set_ylim(0, 100)
        ax.set_ylabel("images showing the target (%)")
        n = int(rows["n_trials"].max()) if len(rows) else 0
        ax.set_title(f"{category}: {attack} (n up to {n} per method; lower is better)", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
