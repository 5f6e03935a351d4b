"""A small test world (one concept, four methods) through a real SLURM scheduler
(`tests/slurm_cluster.sh start` first).

Every non-local job must go through sbatch, GPU jobs must get CUDA_VISIBLE_DEVICES, an erase
job cancelled by the scheduler (`scancel`, as a preemption) once its first checkpoint exists
must be retried and resume from it, and the table must equal the local run's. In CI (CI=true)
a cluster that is not up is a failure, not a skip.
"""

import os
import re
import shutil
import subprocess
import threading
import time

import pytest
import yaml
from helpers import REPO, make_workdir, snakemake

# One concept and four methods (the base model, two trained, one closed form): every kind of
# job goes through the scheduler; the other methods add time, not coverage.
LEFT_OUT = ("realera", "crce-sphere", "crce-fixed", "uce-cr")
METHODS = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["methods"]
KEPT = {m: spec for m, spec in METHODS.items() if m not in LEFT_OUT}
CLOSED_FORM = {m for m, spec in KEPT.items() if spec["strategy"] == "uce"}
TRAINED = {m for m, spec in KEPT.items() if spec["strategy"] not in ("none", "uce")}

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ONE_CONCEPT = "concept\tcategory\ncat\tobject\n"


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


# Long enough training that a job is still running when its first checkpoint appears.
SLOW_TRAINING = (
    "train:\n  iterations: 30\n  max_iterations: 30\n  checkpoint_every: 2\nmethods:\n"
    + "".join(f"  {m}: null\n" for m in LEFT_OUT)
)


def run(work, *args, env=None):
    sheet = work / "sheet.tsv"
    sheet.write_text(ONE_CONCEPT)
    overlay = work / "slow-training.yaml"
    overlay.write_text(SLOW_TRAINING)
    base = ["results/table1.csv", "--configfile", "config/test.yaml", str(overlay)]
    return snakemake(work, *base, "--config", f"concepts={sheet}", *args, env=env)


class Preempter(threading.Thread):
    """Cancels each erase job once, through the scheduler, as soon as its first checkpoint
    exists: what a preemption does to a job on a real cluster."""

    def __init__(self, work):
        super().__init__(daemon=True)
        self.work, self.cancelled, self.stop = work, set(), threading.Event()

    def run(self):
        while not self.stop.is_set():
            for checkpoint in (self.work / "results" / ".checkpoints").glob("*/*/checkpoint.pt"):
                method, concept = checkpoint.parent.parent.name, checkpoint.parent.name
                if (method, concept) not in self.cancelled:
                    self.cancel(method, concept)
            time.sleep(0.2)

    def cancel(self, method, concept):
        queue = subprocess.run(["squeue", "-h", "-o", "%i %k"], capture_output=True, text=True)
        for line in queue.stdout.splitlines():
            job, _, comment = line.partition(" ")
            if comment.startswith("rule_erase") and method in comment and concept in comment:
                subprocess.run(["scancel", job], check=True)
                self.cancelled.add((method, concept))


def test_table1_through_slurm_equals_the_local_run(cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # same threads in both runs: identical floats
    local = make_workdir(tmp_path / "local")
    assert run(local).returncode == 0

    work = make_workdir(tmp_path / "slurm")
    (work / "slurm").symlink_to(REPO / "slurm")
    small = "mem_mb=1500 cpus_per_task=1"
    set_resources = [f"{rule}:{kv}" for rule in ("base_model", "coref_lists", "erase", "sample", "judge")
                     for kv in small.split()]  # fmt: skip
    preempter = Preempter(work)
    preempter.start()
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
    )  # fmt: skip
    preempter.stop.set()
    assert result.returncode == 0, result.stdout[-6000:]
    assert preempter.cancelled == {(m, "cat") for m in TRAINED}, preempter.cancelled
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
        local_rule = (
            log.parts[-2] in ("splits", "grids", "bars")
            or log.name == "metrics.log"
            or (log.parts[-2] == "mace" and log.name.startswith("prompts-"))  # a fetch
        )
        assert job, log
        assert (job.group(1) == "-") == local_rule, (
            f"{log}: local rules run on the submit host only"
        )
        if "erase" in log.parts and log.parent.name in CLOSED_FORM:  # UCE solves on a CPU
            assert job.group(2) == "-", f"{log}: a closed-form job was given a GPU"
        elif {"corefs", "erase", "sample", "judge"} & set(log.parts):
            assert job.group(2) != "-", f"{log}: a GPU job without CUDA_VISIBLE_DEVICES"
    for log in (work / "logs" / "erase").rglob("*.log"):
        if log.parent.name not in CLOSED_FORM:
            assert re.search(r"resuming from \S+ at iteration \d+", log.read_text()), log
