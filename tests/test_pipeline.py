"""The tiny test world end to end through Snakemake, on CPU (the same rules as the study):
its outputs, and what a rerun plans after a change. Every test shares one finished run."""

import json
import re

import pandas as pd
import pytest
import yaml
from helpers import REPO, snakemake

pytestmark = pytest.mark.slow
CONFIG = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
TRAINED = [m for m, spec in CONFIG["methods"].items() if spec["strategy"] != "none"]
# The ESD family (UCE solves; MACE trains a LoRA on its own images, with no DDIM rollout).
ITERATIVE = [m for m in TRAINED if CONFIG["methods"][m]["strategy"] not in ("uce", "mace")]
# metrics, Table 1's figures (3 categories in the test sheet), retains close/far, the target
AGGREGATES = {"metrics": 1, "category_figure": 3, "retains_by_distance": 1, "all": 1}
# Every name docs/METRICS.md defines (in backticks).
DOCUMENTED = set(re.findall(r"`([A-Za-z_]+)`", (REPO / "docs" / "METRICS.md").read_text()))


def undocumented(frame: pd.DataFrame) -> set[str]:
    """The table's metrics (its numeric columns, the values of a `metric` column; Table 1's
    `category/metric` columns by metric) that docs/METRICS.md has no entry for."""
    names = set(frame.select_dtypes("number").columns) | set(frame.get("metric", []))
    return {name.split("/")[-1] for name in names} - DOCUMENTED


def test_table1_has_one_row_per_method_in_the_papers_layout(test_world):
    work = test_world.work
    table = pd.read_csv(work / "results" / "table1.csv")
    labels = [spec["label"] for spec in CONFIG["methods"].values()]
    paper = ["SD", "ESD-x", "MACE", "RealEra", "CRCE-Sphere", "CRCE-Fixed", "CRCE"]
    assert list(table["method"]) == [*paper, "UCE", "UCE-CR"]  # the paper's order, then ours
    assert sorted(table["method"]) == sorted(labels)
    metrics = ["Acc_U", "Acc_C_train", "Acc_C_test", "Acc_R_train", "Acc_R_test"]
    expected = ["method"] + [f"{c}/{m}" for c in ("object", "ip", "celebrity") for m in metrics]
    assert list(table.columns) == expected
    assert table.drop(columns="method").stack().between(0, 100).all()
    assert (work / "results" / "table1.md").exists()
    versus = pd.read_csv(work / "results" / "table1_vs_paper.csv")
    assert set(versus["method"]) == set(paper)  # every paper row we have
    long = pd.read_parquet(work / "results" / "metrics.parquet")
    columns = {"method", "concept", "category", "group", "n", "accuracy", "ci_low", "ci_high"}
    assert columns | {"mean_p_yes"} <= set(long.columns)
    assert len(list((work / "results" / "figures" / "grids").glob("*.png"))) == 4


def test_manifest_seeds_are_identical_across_methods(test_world):
    images = test_world.work / "results" / "images"
    seeds = {
        m: list(pd.read_parquet(images / m / "cat" / "manifest.parquet")["seed"])
        for m in CONFIG["methods"]
    }
    assert all(s == seeds["sd"] for s in seeds.values())


def test_training_noise_is_paired_across_methods(test_world):
    """Every method of a concept trained on the same DDIM indices (and x_T) at each iteration."""
    import json

    models = test_world.work / "results" / "models"
    indices = {
        m: [h["ddim_index"] for h in json.loads((models / m / "cat" / "train.json").read_text())["history"]]
        for m in ITERATIVE
    }  # fmt: skip
    assert len({tuple(v) for v in indices.values()}) == 1, indices


def test_text_distances_obey_the_unit_vector_identity(test_world):
    """The pipeline's own Table 2 output: Euclidean = sqrt(2 - 2 cos) on every row."""
    for path in (test_world.work / "results" / "clip_distances").glob("*.csv"):
        table = pd.read_csv(path)
        assert ((table["euclidean"] - (2 - 2 * table["cosine"]) ** 0.5).abs() < 1e-4).all()


def test_adding_a_row_plans_only_that_concept(test_world):
    """Only the new concept's jobs and the aggregates; existing outputs stay untouched."""
    assert test_world.plan() == {}
    extended = test_world.work / "sheet-plus-dog.tsv"
    extended.write_text(test_world.sheet.read_text() + "dog\tobject\n")
    per_concept = {
        "coref_lists": 1,
        "split": 1,
        "reference_images": 1,  # MACE's images of dog, with their masks
        "erase": 8,
        "sample": 9,
        "judge": 1,
        "concept_figure": 1,
        "clip_distances": 1,
        "table2_vs_paper": 1,  # dog: the paper printed its Table 2
    }
    assert test_world.plan(sheet=extended) == {**per_concept, **AGGREGATES, "total": 30}
    splits = test_world.work / "results" / "splits"
    before = {p.name: p.stat().st_mtime_ns for p in splits.glob("*.json")}
    result = snakemake(test_world.work, "splits", *test_world.args(sheet=extended))
    assert result.returncode == 0, result.stdout[-3000:]
    after = {p.name: p.stat().st_mtime_ns for p in splits.glob("*.json")}
    assert set(after) - set(before) == {"dog.json"}
    assert all(after[name] == mtime for name, mtime in before.items())


# -- what a changed setting reruns (every count fails if a setting is not its rule's param) --
def test_a_new_learning_rate_retrains_every_method_and_nothing_upstream(test_world):
    plan = test_world.plan(train={"lr": 5e-3})
    assert plan == {
        "erase": 20,  # the 5 iterative methods' (UCE has no learning rate)
        "sample": 20,  # their images; SD's and UCE's stay
        "judge": 4,
        "concept_figure": 4,
        **AGGREGATES,
        "total": 54,
    }


def test_a_new_trainer_version_retrains_every_concept(test_world, tmp_path):
    """Weights from an older trainer are never reused: the version is a param of erase."""
    import shutil

    world = test_world.copy(tmp_path / "world")
    (world.work / "src").unlink()
    shutil.copytree(REPO / "src", world.work / "src")
    settings = world.work / "src" / "crce" / "constants.py"
    text = settings.read_text()
    assert "\nTRAINER_VERSION = " in text
    settings.write_text(text.replace("\nTRAINER_VERSION = ", "\nTRAINER_VERSION = 1 + ", 1))
    plan = world.plan()
    assert plan["erase"] == len(TRAINED) * 4  # every trained method of the 4 concepts
    assert plan["sample"] == len(TRAINED) * 4 and plan["judge"] == 4
    assert "coref_lists" not in plan and "split" not in plan


def test_new_sampling_steps_resample_and_rejudge_without_retraining(test_world):
    plan = test_world.plan(sample={"steps": 4})
    assert plan == {"sample": 36, "judge": 4, "concept_figure": 4, **AGGREGATES, "total": 50}


def test_a_new_judge_prompt_rejudges_only(test_world):
    prompt = "Does the image show <X>? Answer yes or no."
    assert test_world.plan(judge={"prompt": prompt}) == {"judge": 4, **AGGREGATES, "total": 10}


def test_a_new_split_size_resplits_without_new_lists(test_world):
    # (The Table 6 grid draws up to 10 items: it must shrink with the split, or the config
    # is refused before any job.)
    sweep = {"n_corefs": [1, 3], "n_retains": [1, 3], "categories": ["object"], "method": "crce"}
    plan = test_world.plan(split={"n_train": 9}, sweep=sweep)
    assert "coref_lists" not in plan
    assert plan["split"] == 4 and plan["erase"] == 32 and plan["sample"] == 36
    assert plan["clip_distances"] == 4 and plan["judge"] == 4


def test_one_methods_override_reruns_that_method_only(test_world):
    plan = test_world.plan(methods={"crce": {"lr": 5e-3}})
    assert plan == {
        "erase": 4,  # crce's, one per concept
        "sample": 4,
        "judge": 4,  # a concept's judge job judges all its methods (from its cache)
        "concept_figure": 4,
        **AGGREGATES,
        "total": 22,
    }


def test_settings_that_change_no_result_rerun_nothing(test_world):
    untracked = {
        "train": {"checkpoint_every": 3, "device": "cpu", "compile": False},
        "sample": {"batch_size": 7, "device": "cpu"},
        "judge": {"concurrency": 3, "timeout": 30, "max_retries": 2, "startup_timeout": 99},
        "llm": {"timeout": 30, "max_attempts": 5, "max_retries": 3, "retry_wait_max": 2},
    }
    assert test_world.plan(**untracked) == {}


def test_a_released_checkpoint_takes_maces_row(test_world, tmp_path):
    """An external method from checkpoints in the official CRCE .pt layout, made here, on two
    concepts: no training; a concept without one fails alone, naming itself and the path; MACE
    takes its paper row position and is set beside the paper's MACE row."""
    import torch

    from crce.modeling import load_pipeline

    world = test_world.copy(tmp_path / "world")
    folder = tmp_path / "mace"
    folder.mkdir()
    unet = load_pipeline(str(world.work / "results" / "base-model" / "tiny")).unet
    checkpoint = {
        f"unet.{name}": {"weight": module.weight.detach() * 0.5}
        for name, module in unet.named_modules()
        if ".attn2." in f".{name}" and name.endswith(("to_k", "to_v"))
    }
    torch.save(checkpoint, folder / "cat.pt")  # not beyonce
    mace = {"strategy": "external", "label": "MACE", "path": str(folder / "{concept}.pt")}
    args = world.args(sheet=world.subset("cat", "Beyoncé"), methods={"mace": mace})
    first = snakemake(world.work, "--keep-going", "table1", *args)
    assert first.returncode != 0
    log = (world.work / "logs" / "erase" / "mace" / "beyonce.log").read_text()
    assert "'Beyoncé' (beyonce): no checkpoint at" in log and str(folder / "beyonce.pt") in log
    torch.save(checkpoint, folder / "beyonce.pt")
    second = snakemake(world.work, "table1", *args)
    assert second.returncode == 0, second.stdout[-3000:]
    table = pd.read_csv(world.work / "results" / "table1.csv")
    assert list(table["method"])[:3] == ["SD", "ESD-x", "MACE"]
    versus = pd.read_csv(world.work / "results" / "table1_vs_paper.csv")
    assert "MACE" in set(versus["method"])
    import json

    record = json.loads(
        (world.work / "results" / "models" / "mace" / "cat" / "train.json").read_text()
    )
    assert record["external"]["format"] == "crce-pt" and record["external"]["changed_tensors"] == 20
    assert "iterations" not in record  # nothing trained


def test_a_2x2_sweep_writes_table6(test_world, tmp_path):
    """Table 6's grid in the test world on one concept: its (5, 3) cell is Table 1's CRCE (not
    retrained)."""
    world = test_world.copy(tmp_path / "world")
    sweep = {"n_corefs": [3, 5], "n_retains": [1, 3], "categories": ["object"], "method": "crce"}
    cat = world.subset("cat")
    args = world.args(sheet=cat, sweep=sweep)
    plan = world.plan("table6", sheet=cat, sweep=sweep)
    assert plan["erase"] == 3  # three new cells, no CRCE retraining
    result = snakemake(world.work, "table6", "table1", *args)  # Table 1 of the same concept
    assert result.returncode == 0, result.stdout[-3000:]
    table = pd.read_csv(world.work / "results" / "table6.csv")
    assert sorted(zip(table["M"], table["N"], strict=True)) == [(3, 1), (3, 3), (5, 1), (5, 3)]
    assert set(table["category"]) == {"object"}
    table1 = pd.read_csv(world.work / "results" / "table1.csv").set_index("method")
    cell = table[(table["M"] == 5) & (table["N"] == 3)].iloc[0]
    for metric in ("Acc_U", "Acc_C_train", "Acc_R_test"):
        assert cell[metric] == table1.loc["CRCE", f"object/{metric}"], metric
    assert len(list((world.work / "results" / "figures" / "table6").glob("*.png"))) == 5


def test_the_targets_beyond_table1_run_in_the_test_world(test_world, tmp_path):
    """quality, robustness and judge_audit through Snakemake on the finished world (a copy),
    one concept per category and one method per kind (a job each costs seconds of imports on
    2 cores): tables of the expected shape, with n and spreads, values within their ranges."""
    world = test_world.copy(tmp_path / "world")
    subset = world.subset("cat", "Harry Potter", "Beyoncé")
    kept = ("sd", "esd-x", "crce", "uce-cr")  # base, ESD, the paper's method, closed form
    left_out = dict.fromkeys(m for m in CONFIG["methods"] if m not in kept)
    args = world.args(sheet=subset, methods=left_out)
    result = snakemake(world.work, "quality", "robustness", "judge_audit", *args)
    assert result.returncode == 0, result.stdout[-4000:]
    results = world.work / "results"
    quality = pd.read_csv(results / "quality.csv")
    methods = [spec["label"] for m, spec in CONFIG["methods"].items() if m in kept]
    paired = quality[quality.metric == "paired_similarity"]
    assert set(paired["method"]) == set(methods) - {"SD"} and set(paired["scope"]) == {
        "object", "ip", "celebrity"
    }  # fmt: skip
    assert paired["value"].between(-1, 1).all() and (paired["n"] > 0).all()
    for metric in ("clip_score", "fd_vs_sd", "kid_vs_sd"):
        rows = quality[quality.metric == metric]
        assert len(rows) == len(methods) - (metric != "clip_score"), metric
        assert (rows["n"] == 36).all() and rows["spread"].notna().all(), metric
    robust = pd.read_csv(results / "robustness.csv")
    assert set(robust["prompts"]) == {"paraphrase", "template", "all"}
    table1 = pd.read_csv(results / "table1.csv").set_index("method")
    for row in robust[robust.prompts == "all"].itertuples():
        assert row.Acc_U == table1.loc[row.method, f"{row.category}/Acc_U"]
        assert 0 <= row.Acc_P <= 100 and row.n > 0
    prompts = json.loads((results / "robustness" / "prompts" / "cat.json").read_text())
    assert [p["kind"] for p in prompts["prompts"]].count("paraphrase") == 3
    assert not any("cat" in p["text"] for p in prompts["prompts"] if p["kind"] == "paraphrase")
    for table in ("quality.csv", "robustness.csv", "judge_audit.csv"):
        assert not undocumented(pd.read_csv(results / table)), table
    audit = pd.read_csv(results / "judge_audit.csv")
    assert len(audit) == 15 and audit["agreement"].between(0, 1).all()  # 3 categories x 5 groups
    sheet = pd.read_csv(results / "audit" / "sheet.csv", keep_default_na=False)
    assert len(sheet) == 12 and (sheet["human"] == "").all()
    assert (results / "audit" / "sheet.html").read_text().count("<img") == 12


def test_every_metric_of_the_results_is_defined_in_docs_metrics(test_world):
    results = test_world.work / "results"
    tables = [pd.read_parquet(results / "metrics.parquet")] + [
        pd.read_csv(path) for path in [*results.glob("*.csv"), *results.glob("clip_distances/*")]
    ]
    assert len(tables) >= 6
    for table in tables:
        assert not undocumented(table), sorted(table.columns)


def test_report_shows_tables_and_figures(test_world):
    result = snakemake(test_world.work, "--report", "report.html", "table1", *test_world.args())
    assert result.returncode == 0, result.stdout[-3000:]
    html = (test_world.work / "report.html").read_text(errors="replace")
    assert "table1.csv" in html and "table1_vs_paper.csv" in html
    assert "grids" in html or "Image grids" in html
