"""The workflow as Snakemake sees it: config overlays, DAG shape, add-a-row, lint."""

import hashlib
import json
import re
import shutil
import subprocess

import pytest
import yaml
from helpers import COREFCONCEPT, REPO, planned, snakemake
from snakemake.utils import update_config

SCALE_KEYS = [
    ("model", "pretrained"),
    ("llm", "serve"),
    ("judge", "serve"),
    ("concepts",),
    ("train", "iterations"),
    ("sample", "images_per_prompt"),
    ("sample", "resolution"),
]


def resolved(overlay: str) -> tuple[dict, dict]:
    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    merged = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    update_config(merged, yaml.safe_load((REPO / "config" / overlay).read_text()))
    return base, merged


def get(config, keys):
    for key in keys:
        config = config[key]
    return config


@pytest.mark.parametrize("overlay", ["test.yaml", "demo.yaml"])
def test_overlay_overrides_every_scale_key(overlay):
    base, merged = resolved(overlay)
    for keys in SCALE_KEYS:
        assert get(merged, keys) != get(base, keys), f"{overlay} does not override {'.'.join(keys)}"


@pytest.mark.parametrize(
    "overlay",
    ["config.yaml"] + [p.name for p in (REPO / "config").glob("*.yaml") if p.name != "config.yaml"],
)
def test_configs_validate_against_the_schema(overlay):
    from snakemake.utils import validate

    base, merged = (
        resolved(overlay)
        if overlay != "config.yaml"
        else (None, yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    )
    validate(merged, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))


def test_the_schema_and_the_key_tables_are_what_the_settings_models_generate(tmp_path):
    """The models are the truth: the committed schema and config/README.md's tables match
    what they generate, and a hand edit of either is caught."""
    from crce.config_schema import DOCS, SCHEMA, stale

    assert stale() == {}, "run `python -m crce.config_schema` and commit what it writes"
    schema, docs = tmp_path / "schema.yaml", tmp_path / "README.md"
    schema.write_text(SCHEMA.read_text().replace("minimum: 0\n", "minimum: 1\n", 1))
    docs.write_text(DOCS.read_text())
    assert set(stale(schema, docs)) == {schema}
    schema.write_text(SCHEMA.read_text())
    docs.write_text(DOCS.read_text().replace("| `train.lr` |", "| `train.learning_rate` |"))
    assert set(stale(schema, docs)) == {docs}


def test_every_config_key_is_commented():
    """Each leaf key has an inline comment or a comment above its run of sibling keys."""
    lines = (REPO / "config" / "config.yaml").read_text().splitlines()
    leaf = re.compile(r"^(\s*)[a-z_-]+:\s*\S")
    in_methods = False
    for n, line in enumerate(lines):
        if re.match(r"^[a-z]", line):
            in_methods = line.startswith("methods:")
        if in_methods or not leaf.match(line) or "#" in line:
            continue
        k = n - 1
        while k >= 0 and leaf.match(lines[k]) and "#" not in lines[k]:
            k -= 1
        assert k >= 0 and lines[k].strip().startswith("#"), (
            f"config.yaml:{n + 1} {line.strip()!r} has no comment"
        )


def test_dry_run_plans_50_corefs_and_50_splits(workdir):
    result = snakemake(workdir, "-n", "splits")
    assert result.returncode == 0, result.stdout
    counts = planned(result.stdout)
    assert counts["coref_lists"] == 50 and counts["split"] == 50


def test_lint_is_clean(workdir):
    result = snakemake(workdir, "--lint")
    assert result.returncode == 0, result.stdout


def test_unknown_strategy_fails_at_parse_time(workdir):
    result = snakemake(workdir, "-n", "splits", "--config", "methods={'x': {'strategy': 'magic'}}")
    assert result.returncode != 0 and "magic" in result.stdout


def test_images_target_plans_no_judging(workdir):
    counts = planned(snakemake(workdir, "-n", "images", "--configfile=config/test.yaml").stdout)
    assert counts["sample"] == 36 and counts["erase"] == 32  # 9 methods, 8 trained
    assert not {"judge", "metrics", "concept_figure", "category_figure"} & set(counts)


def dataset_overlay(tmp_path, sheet_text: str, dataset: str) -> str:
    """An overlay with its own sheet, the dataset at `dataset` and an LLM that cannot answer."""
    sheet = tmp_path / "sheet.tsv"
    sheet.write_text("concept\tcategory\n" + sheet_text)
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(
        yaml.safe_dump(
            {
                "concepts": str(sheet),
                "corefs": {"dataset": dataset, "curated_dir": None},
                "llm": {
                    "base_url": "http://127.0.0.1:9/v1",
                    "max_retries": 2,
                    "retry_wait_max": 0.1,
                },
            }
        )
    )
    return str(overlay)


@pytest.mark.slow
def test_the_papers_lists_come_from_the_pinned_dataset(workdir, tmp_path):
    """URL mode against a local server with the shared files: the dataset's concepts get its
    lists and its 10/5 split, checked against the pinned sha256, with no LLM call; a concept
    the dataset lacks goes to the (here unreachable) LLM and fails alone, naming itself."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(COREFCONCEPT))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        rows = "deer\tobject\ntruck\tobject\nApple (company)\tobject\nBatman\tip\nzebra crossing\tobject\n"
        overlay = dataset_overlay(tmp_path, rows, f"http://127.0.0.1:{server.server_port}")
        result = snakemake(workdir, "--keep-going", "splits", "--configfile", overlay)
    finally:
        server.shutdown()
    assert result.returncode != 0
    splits = sorted(p.stem for p in (workdir / "results" / "splits").glob("*.json"))
    assert splits == ["apple-company", "batman", "deer", "truck"]
    fetched = sorted(p.name for p in (workdir / "results" / "corefconcept").glob("*.json"))
    assert fetched == ["ip.json", "object.json"]  # no celebrity in the sheet: not fetched
    lists = json.loads((workdir / "results" / "corefs" / "batman.json").read_text())
    assert lists["provenance"]["source"] == "corefconcept"
    assert (
        lists["provenance"]["sha256"]
        == hashlib.sha256((COREFCONCEPT / "ip.json").read_bytes()).hexdigest()
    )
    assert lists["provenance"]["origin"].endswith("/ip.json")
    split = json.loads((workdir / "results" / "splits" / "batman.json").read_text())
    entry = next(
        e
        for e in json.loads((COREFCONCEPT / "ip.json").read_text())["ip"]
        if e["concept"] == "Batman"
    )
    assert [i["text"] for i in split["coref_train"]] == entry["train-coref"]
    log = (workdir / "logs" / "corefs" / "zebra-crossing.log").read_text()
    assert "not in the CorefConcept dataset" in log and "no LLM answered" in log
    assert re.findall(r"Error in rule (\w+):", result.stdout) == ["coref_lists"]


def test_a_local_dataset_without_a_needed_file_stops_before_any_job(workdir, tmp_path):
    overlay = dataset_overlay(tmp_path, "cat\tobject\nTom Hanks\tcelebrity\n", str(COREFCONCEPT))
    result = snakemake(workdir, "-n", "splits", "--configfile", overlay)
    assert result.returncode != 0
    assert "has no celebrity.json" in result.stdout and "Tom Hanks" in result.stdout
    ok = dataset_overlay(tmp_path, "cat\tobject\nBatman\tip\n", str(COREFCONCEPT))
    assert snakemake(workdir, "-n", "splits", "--configfile", ok).returncode == 0


def test_the_official_profile_sets_every_knob_of_the_official_code():
    from crce.study import Study

    _, merged = resolved("official.yaml")
    study = Study(merged)
    for name in ("esd-x", "crce", "crce-fixed", "crce-sphere", "realera"):
        s = study.trained[name].settings
        assert (s.params, s.lr, s.precision) == ("xattn-qk", 2e-5, "float32"), name
        assert (s.iterations, s.eta, s.start_guidance, s.ddim_steps) == (500, 1.0, 3.0, 50)
        assert s.xt_model == "trained"
        assert name == "esd-x" or (s.alpha, s.beta) == (1.0, 1.0)  # ESD-x has no such terms
    assert study.trained["crce"].settings.coref_anchor == "self"
    assert study.trained["crce-sphere"].settings.coref_anchor == "self"
    realera = study.trained["realera"].settings
    assert (realera.n_corefs, realera.n_retains, realera.coref_anchor) == (5, 3, "target")
    assert (realera.sphere.radius, realera.sphere.radius_mode) == (400, "absolute")
    paper = Study(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    paper_realera = paper.trained["realera"].settings
    assert (paper_realera.n_corefs, paper_realera.n_retains) == (10, 2)
    assert (study.sample, study.judge) == (paper.sample, paper.judge)
    assert study.sample.scheduler == "ddim" and study.sample.steps == 50


def test_full_paper_dag_dry_run(workdir, tmp_path):
    """50 concepts x 9 methods (wall time recorded in BENCHMARKS.md, not asserted): one job per
    concept trains its five methods as a group (train.group_methods), or one per method."""
    result = snakemake(workdir, "-n", "results/table1.csv")
    assert result.returncode == 0, result.stdout[-3000:]
    counts = planned(result.stdout)
    assert counts["erase_group"] == 50  # the five iterative methods of each concept
    assert counts["erase"] == 150  # MACE (its stages), UCE and UCE-CR (one small job each)
    assert counts["sample"] == 450 and counts["judge"] == 50 and counts["metrics"] == 1
    assert counts["reference_images"] == 50 and counts["mace_cache"] == 1  # MACE's inputs
    overlay = tmp_path / "solo.yaml"
    overlay.write_text("train:\n  group_methods: false\n")
    solo = snakemake(workdir, "-n", "results/table1.csv", "--configfile", str(overlay))
    assert planned(solo.stdout)["erase"] == 400 and "erase_group" not in planned(solo.stdout)
    overlay.write_text("methods:\n  realera: null\n  uce-cr: null\n")  # an overlay drops two
    fewer = planned(
        snakemake(workdir, "-n", "results/table1.csv", "--configfile", str(overlay)).stdout
    )
    assert (fewer["erase_group"], fewer["erase"], fewer["sample"]) == (50, 100, 350)


# Which settings are a rule's params (a change reruns what it affects) and which travel
# untracked (no result changes beyond float noise). Kept by hand: the two sets stay deliberate.
RESULT_KEYS = {
    "seed", "model.pretrained",
    "corefs.curated_dir", "corefs.dataset", "corefs.dataset_sha256",
    "llm.model", "llm.temperature", "llm.seed", "llm.structured_output",
    "split.n_train", "split.n_test",
    "train.params", "train.lr", "train.iterations", "train.eta", "train.coref_anchor",
    "train.xt_model", "train.start_guidance", "train.ddim_steps", "train.alpha", "train.beta",
    "train.sphere", "train.precision",
    "sample.images_per_prompt", "sample.steps", "sample.guidance", "sample.resolution",
    "sample.precision", "sample.scheduler",
    "judge.model", "judge.prompt", "judge.prompt_version", "judge.retain_question",
    "judge.structured_output",
}  # fmt: skip
RUNTIME_KEYS = {
    "llm.base_url", "llm.api_key_env", "llm.serve", "llm.startup_timeout", "llm.timeout",
    "llm.max_attempts", "llm.max_retries", "llm.retry_wait_max",
    "train.compile", "train.gradient_checkpointing", "train.checkpoint_every", "train.device",
    "train.group_methods", "train.max_iterations",
    "sample.batch_size", "sample.device",
    "judge.serve", "judge.base_url", "judge.api_key_env", "judge.startup_timeout",
    "judge.concurrency", "judge.timeout", "judge.max_retries",
}  # fmt: skip


def test_every_setting_is_either_a_param_or_deliberately_untracked():
    from crce import methods
    from crce import settings as s

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    keys = {"seed"} | {
        f"{section}.{key}"
        for section in ("model", "corefs", "llm", "split", "train", "sample", "judge")
        for key in config[section]
    }
    keys -= {"model.build"}  # which builder makes the model: the model path is the param
    assert keys == RESULT_KEYS | RUNTIME_KEYS and not RESULT_KEYS & RUNTIME_KEYS
    runtime = {
        "llm": s.LlmRuntime,
        "train": s.TrainRuntime,
        "sample": s.SampleRuntime,
        "judge": s.JudgeRuntime,
    }
    for key in RUNTIME_KEYS:
        section, name = key.split(".")
        assert name in runtime[section].model_fields, key
    trained = [methods.load(n) for n in methods.BUILTIN]
    train_keys = {k for cls in trained if cls.section == "train" for k in cls.section_keys()}
    results = {
        "corefs": set(s.ListSettings.model_fields),
        "llm": set(s.ListSettings.model_fields),
        "split": set(s.SplitSettings.model_fields),
        "train": train_keys,
        "sample": set(s.SampleSettings.model_fields),
        "judge": set(s.JudgeSettings.model_fields),
    }
    for key in RESULT_KEYS - {"seed", "model.pretrained"}:
        section, name = key.split(".")
        assert name in results[section], key
        assert name not in runtime.get(section, s.TrainRuntime).model_fields, key


def test_every_report_item_has_a_caption():
    text = "\n".join(p.read_text() for p in (REPO / "workflow" / "rules").glob("*.smk"))
    items = re.findall(r"report\((.*?)\n\s*\)", text, re.S) + re.findall(
        r"report\(([^\n]*)\)", text
    )
    assert items
    for item in items:
        caption = re.search(r'caption="([^"]+)"', item)
        assert caption, item
        assert (REPO / "workflow" / "rules" / caption.group(1)).resolve().is_file(), caption


@pytest.mark.slow
def test_a_job_runs_the_checkouts_code_not_an_installed_copy(tmp_path):
    """Envs carry no copy of crce: an edit to src/crce reaches the next job as it is, with no
    env to rebuild (here the venv's editable install points at another tree)."""
    from helpers import make_workdir

    work = make_workdir(tmp_path)
    (work / "src").unlink()
    shutil.copytree(REPO / "src", work / "src", ignore=shutil.ignore_patterns("*.egg-info"))
    logs = work / "src" / "crce" / "logs.py"
    text = logs.read_text()
    marker = "    try:\n        yield logger"
    assert marker in text
    logs.write_text(text.replace(marker, '    logger.info("edited in the checkout")\n' + marker))
    sheet = tmp_path / "one.tsv"
    sheet.write_text("concept\tcategory\ncat\tobject\n")
    args = ["--configfile", "config/test.yaml", "--config", f"concepts={sheet}"]
    result = snakemake(work, "results/splits/cat.json", *args)
    assert result.returncode == 0, result.stdout[-3000:]
    for log in ("corefs/cat.log", "splits/cat.log"):
        assert "edited in the checkout" in (work / "logs" / log).read_text(), log


def test_the_papers_table6_plans_each_cell_once(workdir):
    """4 x 4 cells on the 20 object concepts: 15 cells of the sweep's own, trained as one group
    per concept, and (5, 3), which is Table 1's CRCE (trained with Table 1's group)."""
    result = snakemake(workdir, "-n", "table6")
    assert result.returncode == 0, result.stdout[-3000:]
    counts = planned(result.stdout)
    assert counts["erase_sweep"] == 20 and counts["judge_sweep"] == 20
    assert counts["erase_group"] == 20  # Table 1's, CRCE among its methods
    pattern = r"results/images/(crce|crce-m\d+-n\d+)/([a-z0-9-]+)/manifest\.parquet"
    cells = re.findall(pattern, result.stdout)
    sampled = {(m, c) for m, c in cells}
    assert len({m for m, _ in sampled}) == 16  # crce and its 15 cells
    assert len(sampled) == 16 * 20 and counts["table6_figure"] == 5


@pytest.mark.parametrize(
    "overlay, message",
    [
        ({"split": {"n_train": 12, "n_test": 5}}, "split.n_train + split.n_test = 12 + 5 = 17"),
        ({"methods": {"crce": {"n_corefs": 11}}}, "methods.crce: n_corefs=11 draws more"),
        ({"split": {"n_train": 4}, "corefs": {"dataset": None}},
         "methods.crce-fixed: n_corefs=5 draws more items per iteration than a train split has (4)"),
        ({"sweep": {"n_retains": [1, 10], "n_corefs": [1], "categories": ["object"],
                    "method": "crce"}, "split": {"n_train": 9}, "corefs": {"dataset": None}},
         "sweep: M=1, N=10 draw more items than the train split has (split.n_train=9)"),
    ],
)  # fmt: skip
def test_a_contradiction_in_the_config_is_refused_before_any_job(overlay, message):
    """What the config alone decides fails when the config is read, not hours later in a job."""
    from crce.study import SettingsError, Study

    _, config = resolved("config.yaml")
    update_config(config, overlay)
    with pytest.raises(SettingsError) as caught:
        Study(config)
    assert message in str(caught.value)


def test_a_contradiction_stops_the_dry_run_naming_the_keys(workdir):
    (workdir / "big-split.yaml").write_text("split:\n  n_train: 12\n  n_test: 5\n")
    result = snakemake(workdir, "-n", "table1", "--configfile", "big-split.yaml")
    assert result.returncode != 0
    assert "bad config: split.n_train + split.n_test = 12 + 5 = 17" in result.stdout


def test_a_read_only_results_folder_is_one_line_naming_it(workdir):
    """A results/ the workflow cannot write (here a read-only mount: root writes anywhere else)
    stops the run before any job, naming the folder, not in a Snakemake traceback."""
    results = workdir / "results"
    results.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(results)],
                             capture_output=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only folder here: {mounted.stderr.decode()[:200]}")
    try:
        result = snakemake(workdir, "table1", "--configfile=config/test.yaml")
    finally:
        subprocess.run(["umount", str(results)], check=True)
    assert result.returncode != 0
    assert f"{results} is not writable: the workflow writes its outputs" in result.stdout
    assert "Traceback" not in result.stdout


def test_the_slurm_profile_dry_runs_without_conda_and_a_run_says_what_it_needs(workdir):
    if shutil.which("conda") or shutil.which("mamba"):
        pytest.skip("conda is installed here: the profile's envs can be built")
    (workdir / "slurm").symlink_to(REPO / "slurm")
    plan = snakemake(workdir, "--profile", "slurm", "-n", "results/table1.csv")
    assert plan.returncode == 0, plan.stdout[-2000:]
    assert "conda not found: this dry run plans without the envs" in plan.stdout
    assert planned(plan.stdout)["erase_group"] == 50
    run = snakemake(workdir, "--profile", "slurm", "results/table1.csv")
    assert run.returncode != 0 and "needs conda or mamba on PATH: install Miniforge" in run.stdout
