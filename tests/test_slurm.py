"""The test world through a real SLURM scheduler (`tests/slurm_cluster.sh start` first).

Every non-local job must go through sbatch, GPU jobs must get CUDA_VISIBLE_DEVICES, a failed
GPU job must be retried and resume from its checkpoint, and the table must equal the local
run's. In CI (CI=true) a cluster that is not up is a failure, not a skip.
"""

import os
import re
import shutil
import subprocess

import pytest
from helpers import REPO, make_workdir, snakemake

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TWO_CONCEPTS = "concept\tcategory\ncat\tobject\nHarry Potter\tip\n"


def cluster_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    result = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return result.returncode == 0 and bool(re.search(r"idle|mixed|allocated", result.stdout))


@pytest.fixture(scope="module")
def cluster():
    if not cluster_up():
        message = "no SLURM cluster: run tests/slurm_cluster.sh start (as root)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def run(work, *args, env=None):
    sheet = work / "sheet.tsv"
    sheet.write_text(TWO_CONCEPTS)
    base = ["results/table1.csv", "--configfile=config/test.yaml", "--config", f"concepts={sheet}"]
    return snakemake(work, *base, *args, env=env)


def test_table1_through_slurm_equals_the_local_run(cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # same threads in both runs: identical floats
    local = make_workdir(tmp_path / "local")
    assert run(local).returncode == 0

    work = make_workdir(tmp_path / "slurm")
    (work / "slurm").symlink_to(REPO / "slurm")
    small = "mem_mb=1500 cpus_per_task=1"
    set_resources = [f"{rule}:{kv}" for rule in ("base_model", "coref_lists", "erase", "sample", "judge")
                     for kv in small.split()]  # fmt: skip
    env = {**os.environ, "CRCE_FAULT_AT_ITERATION": "2"}  # every erase job fails once, mid-run
    result = run(
        work,
        "--profile", "slurm",
        "--slurm-status-command", "squeue",
        "--slurm-no-account",
        "--slurm-init-seconds-before-status-checks", "2",
        "--seconds-between-status-checks", "2",
        "--sdm", "env-modules",  # no conda on these machines
        "--default-resources", "slurm_partition=debug", "mem_mb=1000", "cpus_per_task=1", "runtime=30",
        "--set-resources", *set_resources,
        "--jobs", "4",
        env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:]
    assert (work / "results" / "table1.csv").read_text() == (
        local / "results" / "table1.csv"
    ).read_text()

    slurm_logs = work / ".snakemake" / "slurm_logs"
    for rule in ("base_model", "coref_lists", "erase", "sample", "judge"):
        assert list((slurm_logs / f"rule_{rule}").rglob("*.log")), (
            f"{rule} did not go through sbatch"
        )
    for log in (work / "logs").rglob("*.log"):
        if log.name.endswith("server.log"):
            continue
        text = log.read_text()
        job = re.search(r"SLURM_JOB_ID=(\S+), CUDA_VISIBLE_DEVICES=(\S+)", text)
        local_rule = log.parts[-2] in ("splits", "grids", "bars") or log.name == "metrics.log"
        assert job, log
        assert (job.group(1) == "-") == local_rule, (
            f"{log}: local rules run on the submit host only"
        )
        if {"corefs", "erase", "sample", "judge"} & set(log.parts):
            assert job.group(2) != "-", f"{log}: a GPU job without CUDA_VISIBLE_DEVICES"
    for log in (work / "logs" / "erase").rglob("*.log"):
        assert "resuming from" in log.read_text() and "at iteration 2" in log.read_text(), log
