"""The tiny test world end to end through Snakemake, on CPU (the same rules as the study)."""

import shutil

import pandas as pd
import pytest
import yaml
from helpers import REPO, make_workdir, planned, snakemake

pytestmark = pytest.mark.slow
CONFIG = yaml.safe_load((REPO / "config" / "config.yaml").read_text())


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A workdir where `table1` ran to completion on the test world."""
    work = make_workdir(tmp_path_factory.mktemp("pipeline"))
    sheet = work / "sheet.tsv"
    shutil.copy(REPO / "tests" / "data" / "concepts.tsv", sheet)
    args = ["--configfile=config/test.yaml", "--config", f"concepts={sheet}"]
    result = snakemake(work, "table1", *args)
    assert result.returncode == 0, result.stdout[-5000:]
    return work, sheet, args


def test_table1_has_one_row_per_method_in_the_papers_layout(finished):
    work, _, _ = finished
    table = pd.read_csv(work / "results" / "table1.csv")
    labels = [spec["label"] for spec in CONFIG["methods"].values()]
    assert list(table["method"]) == ["SD", "ESD-x", "RealEra", "CRCE-Sphere", "CRCE-Fixed", "CRCE"]
    assert sorted(table["method"]) == sorted(labels)
    metrics = ["Acc_U", "Acc_C_train", "Acc_C_test", "Acc_R_train", "Acc_R_test"]
    expected = ["method"] + [f"{c}/{m}" for c in ("object", "ip", "celebrity") for m in metrics]
    assert list(table.columns) == expected
    assert table.drop(columns="method").stack().between(0, 100).all()
    assert (work / "results" / "table1.md").exists() and (
        work / "results" / "table1_vs_paper.csv"
    ).exists()
    long = pd.read_parquet(work / "results" / "metrics.parquet")
    assert {
        "method",
        "concept",
        "category",
        "group",
        "n",
        "accuracy",
        "ci_low",
        "ci_high",
        "mean_p_yes",
    } <= set(long.columns)
    assert len(list((work / "results" / "figures" / "grids").glob("*.png"))) == 4


def test_manifest_seeds_are_identical_across_methods(finished):
    work, _, _ = finished
    seeds = {
        m: list(
            pd.read_parquet(work / "results" / "images" / m / "cat" / "manifest.parquet")["seed"]
        )
        for m in CONFIG["methods"]
    }
    assert all(s == seeds["sd"] for s in seeds.values())


def test_adding_a_row_plans_only_that_concepts_jobs_plus_aggregates(finished):
    work, sheet, args = finished
    assert "Nothing to be done" in snakemake(work, "-n", "table1", *args).stdout
    extended = work / "sheet2.tsv"
    extended.write_text(sheet.read_text() + "dog\tobject\n")
    args = ["--configfile=config/test.yaml", "--config", f"concepts={extended}"]
    counts = planned(snakemake(work, "-n", "table1", *args).stdout)
    per_concept = {
        "coref_lists": 1,
        "split": 1,
        "erase": 5,
        "sample": 6,
        "judge": 1,
        "concept_figure": 1,
    }
    aggregates = {"metrics": 1, "category_figure": 3, "table1": 1}  # bars read metrics.parquet
    assert counts == {**per_concept, **aggregates, "total": 20}


def test_images_target_plans_no_judging(tmp_path):
    work = make_workdir(tmp_path)
    counts = planned(snakemake(work, "-n", "images", "--configfile=config/test.yaml").stdout)
    assert counts["sample"] == 24 and counts["erase"] == 20
    assert not {"judge", "metrics", "concept_figure", "category_figure"} & set(counts)


def test_report_shows_tables_and_figures(finished):
    work, _, args = finished
    result = snakemake(work, "--report", "report.html", "table1", *args)
    assert result.returncode == 0, result.stdout[-3000:]
    html = (work / "report.html").read_text(errors="replace")
    assert "table1.csv" in html and "table1_vs_paper.csv" in html
    assert "grids" in html or "Image grids" in html
