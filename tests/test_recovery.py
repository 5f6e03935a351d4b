"""After a kill, a damaged file or a failed job, on copies of the shared finished test world:
the command the user already ran recovers, a damaged file is an error naming it and how to
rebuild it, a missing image is found, and no table is reported from inputs that changed."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import REPO, snakemake

pytestmark = pytest.mark.slow


def job_processes(work: Path) -> list[int]:
    """Processes running a script of this workflow folder (Snakemake's job scripts)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if f"{work}/.snakemake/scripts" in cmdline:
            found.append(int(entry.name))
    return found


def start(work: Path, *args: str) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "snakemake"
    return subprocess.Popen([str(exe), "--cores", "2", *args], cwd=work, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def kill_at_first_checkpoint(work: Path, args: list[str], folder: str) -> None:
    """SIGKILL Snakemake (not its jobs) once a checkpoint exists under `folder`: its jobs end
    with it, none is left writing into the outputs."""
    began = time.time()
    process = start(work, *args)
    checkpoints = work / "results" / ".checkpoints" / folder

    def new_checkpoint():
        return [p for p in checkpoints.glob("*/checkpoint.pt") if p.stat().st_mtime > began]

    wait_for(new_checkpoint, 600, "a first checkpoint of this run")
    assert job_processes(work), "no job was running when Snakemake was killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    wait_for(lambda: not job_processes(work), 60, "the jobs to end with Snakemake")


def test_after_a_sigkill_the_same_command_recovers(test_world, tmp_path):
    """SIGKILL mid-training: the jobs end with Snakemake; the same command says how to lift the
    stale lock; after `--unlock` it resumes from the checkpoint and finishes."""
    world = test_world.copy(tmp_path / "world")
    overlay = {
        "methods": {"crce": {"lr": 3e-3, "iterations": 40}},
        "train": {"checkpoint_every": 2, "max_iterations": 40},
    }
    delta = "results/models/crce/cat/delta.safetensors"  # one job: the kill is what is tested
    args = [delta, *world.args(**overlay)]
    kill_at_first_checkpoint(world.work, args, "crce")
    again = snakemake(world.work, *args)
    assert again.returncode != 0 and "--unlock" in again.stdout  # Snakemake's stale lock
    assert snakemake(world.work, "--unlock", *args).returncode == 0
    result = snakemake(world.work, *args)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "resuming from" in (world.work / "logs" / "erase" / "crce" / "cat.log").read_text()
    assert world.plan(delta, **overlay) == {}


def chain_is_of_the_delta_there(world, method: str, concept: str) -> None:
    """The images were drawn from the delta there now, the judgments are of those images, and
    Table 1's row is of those judgments."""
    from crce.digests import files_sha256
    from crce.metrics import compute_metrics, table1

    results = world.work / "results"
    delta = results / "models" / method / concept / "delta.safetensors"
    images = results / "images" / method / concept
    record = json.loads((images / "sampling.json").read_text())
    assert record["delta_sha256"] == files_sha256([delta])
    manifest = pd.read_parquet(images / "manifest.parquet")
    judged = pd.read_parquet(results / "judgments" / method / f"{concept}.parquet")
    assert list(judged["image_sha256"]) == list(manifest["image_sha256"])
    judgments = pd.concat([pd.read_parquet(p) for p in (results / "judgments").glob("*/*.parquet")])
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    labels = {m: spec["label"] for m, spec in config["methods"].items()}
    metrics = compute_metrics(judgments, labels)
    again = table1(metrics, list(labels), labels).set_index("method")
    ours = pd.read_csv(results / "table1.csv").set_index("method")
    assert again.loc[labels[method]].round(2).tolist() == ours.loc[labels[method]].tolist()


def test_a_damaged_delta_names_itself_and_no_table_outlives_the_delta_it_came_from(
    test_world, tmp_path
):
    """Damage a delta: the sample job fails naming it and how to rebuild it; do as told: the
    chain is rebuilt. Then put another delta in its place with an old mtime (Snakemake sees
    nothing to do): the run refuses, naming what is not current; do as told: the images,
    judgments and table are of the delta there now."""
    world = test_world.copy(tmp_path / "world")
    models = world.work / "results" / "models" / "esd-x"
    delta = models / "cat" / "delta.safetensors"
    delta.write_bytes(delta.read_bytes()[:1000])
    failed = snakemake(world.work, "table1", *world.args())
    assert failed.returncode != 0
    log = (world.work / "logs" / "sample" / "esd-x" / "cat.log").read_text()
    relative = str(delta.relative_to(world.work))
    assert f"{relative} is damaged or incomplete" in log
    assert f"rerun the same command with --forcerun {relative} to rebuild it" in log
    rebuilt = snakemake(world.work, "table1", *world.args(), "--forcerun", relative)
    assert rebuilt.returncode == 0, rebuilt.stdout[-3000:]
    assert world.plan("table1") == {}
    chain_is_of_the_delta_there(world, "esd-x", "cat")

    old = delta.stat().st_mtime_ns - 10**12
    shutil.copyfile(models / "bat-animal" / "delta.safetensors", delta)  # another delta
    os.utime(delta, ns=(old, old))
    refused = snakemake(world.work, "table1", *world.args())
    made = "results/images/esd-x/cat/manifest.parquet"
    assert refused.returncode != 0
    assert f"{made} was made from another {relative} than the one there now" in refused.stdout
    forced = refused.stdout.split("Rerun the same command with ")[1].split("\n")[0].split()
    assert forced[0] == "--forcerun" and made in forced
    result = snakemake(world.work, "table1", *world.args(), *forced)
    assert result.returncode == 0, result.stdout[-3000:]
    assert world.plan("table1") == {}
    chain_is_of_the_delta_there(world, "esd-x", "cat")


@pytest.mark.parametrize(
    "damaged, target",
    [
        ("results/splits/cat.json", "results/images/sd/cat/manifest.parquet"),  # a split file
        ("results/corefs/cat.json", "results/splits/cat.json"),  # a list file
        ("results/images/sd/cat/manifest.parquet", "results/judgments/sd/cat.parquet"),
    ],
)
def test_a_damaged_file_is_an_error_that_names_it(test_world, tmp_path, damaged, target):
    """Cut short, as a full disk or a killed copy leaves it: the job that reads it fails."""
    world = test_world.copy(tmp_path / "world")
    path = world.work / damaged
    path.write_bytes(path.read_bytes()[:40])
    result = snakemake(world.work, target, *world.args())
    assert result.returncode != 0
    logs = "".join(p.read_text() for p in (world.work / "logs").rglob("*.log"))
    assert f"{damaged} is damaged or incomplete" in logs
    assert f"rerun the same command with --forcerun {damaged} to rebuild it" in logs
    fixed = snakemake(world.work, target, *world.args(), "--forcerun", damaged)
    assert fixed.returncode == 0, fixed.stdout[-3000:]


def test_a_damaged_checkpoint_names_itself(tiny_model, cat_split, tmp_path):
    from crce.files import DamagedFileError
    from crce.training.engine import Engine

    def engine():
        return Engine.from_settings(
            load(tiny_model), {"m": {"strategy": "esd", "iterations": 2, "ddim_steps": 3}},
            target="cat", split=cat_split, seed=0,
        )  # fmt: skip

    engine().train(tmp_path, progress=False)
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    with pytest.raises(DamagedFileError, match=rf"{checkpoint} is damaged.*delete {tmp_path}"):
        engine().train(tmp_path, progress=False)


def load(model):
    from crce.modeling import load_pipeline

    return load_pipeline(model)


def test_a_missing_image_is_found_and_redrawn_as_the_error_says(test_world, tmp_path):
    world = test_world.copy(tmp_path / "world")
    manifest = world.work / "results" / "images" / "crce" / "cat" / "manifest.parquet"
    listed = pd.read_parquet(manifest)["path"].iloc[3]  # relative to the workflow's folder
    image = world.work / listed
    image.unlink()
    judged = "results/judgments/crce/cat.parquet"
    result = snakemake(world.work, judged, *world.args(), "--forcerun", judged)
    assert result.returncode != 0
    log = (world.work / "logs" / "judge" / "cat.log").read_text()
    forced = str(manifest.relative_to(world.work))
    assert f"{listed} is missing (listed in {forced})" in log
    assert f"rerun the same command with --forcerun {forced}" in log
    again = snakemake(world.work, "table1", *world.args(), "--forcerun", forced)
    assert again.returncode == 0, again.stdout[-3000:]
    sample_log = (world.work / "logs" / "sample" / "crce" / "cat.log").read_text()
    assert "1 of" in sample_log and image.is_file()  # only the missing one was drawn


def test_editing_a_script_reruns_nothing_locally(test_world, tmp_path):
    """The workflow's own profile (profiles/default) leaves out the `code` trigger, as the
    SLURM profile does: a touched script replans no job."""
    world = test_world.copy(tmp_path / "world")
    (world.work / "workflow").unlink()
    shutil.copytree(REPO / "workflow", world.work / "workflow")
    (world.work / "workflow" / "scripts" / "sample.py").touch()
    assert world.plan() == {}


def test_outputs_are_readable_by_the_group(test_world):
    """safetensors writes owner-only files; outputs follow the user's umask (a lab shares)."""
    deltas = list((test_world.work / "results" / "models").glob("*/*/delta.safetensors"))
    base = list((test_world.work / "results" / "base-model" / "tiny").rglob("*.safetensors"))
    mask = os.umask(0)
    os.umask(mask)
    for path in deltas + base:
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path
