"""The GPU run cannot fail for setup reasons: its wheel set is complete for the GPU machine,
and the whole run rehearses on the CPU with the tiny model."""

import json
import os
import re
import subprocess

import pytest
from helpers import REPO
from packaging.requirements import Requirement
from test_envs import normalise, resolve

BENCH = REPO / "bench"


def listed(path) -> list[Requirement]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    return [Requirement(line) for line in lines if line and not line.startswith("#")]


@pytest.mark.slow
def test_the_gpu_wheel_set_is_complete():
    """Resolve the carried wheels with the GPU machine's own packages for python 3.12: all
    that the resolver would install must be either carried or already there (CI runs 3.11)."""
    carried = listed(BENCH / "gpu-requirements.txt")
    device = listed(BENCH / "gpu-device.txt")
    # torch is the machine's and never travels: its CUDA stack is whatever it came with.
    present = [str(r) for r in device if r.name not in ("torch", "triton")]
    result = resolve([str(r) for r in carried] + present, "3.12")
    assert result.returncode == 0, result.stderr[-3000:]
    resolved = {
        normalise(i["metadata"]["name"]): i["metadata"]["version"]
        for i in json.loads(result.stdout)["install"]
    }
    have = {normalise(r.name) for r in carried + device}
    torch_stack = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")
    lacking = sorted(n for n in resolved if n not in have and not torch_stack.match(n))
    assert not lacking, f"the GPU machine would lack {lacking}: add them to gpu-requirements.txt"
    for requirement in carried:
        pinned = next(s.version for s in requirement.specifier)
        assert resolved[normalise(requirement.name)] == pinned, requirement


@pytest.mark.slow
def test_the_gpu_run_rehearses_end_to_end_on_the_cpu(tmp_path):
    result = subprocess.run(
        ["bash", "bench/gpu.sh", "--rehearse"],
        cwd=REPO,
        env={**os.environ, "OUT": str(tmp_path), "PYTHON": str(REPO / ".venv/bin/python")},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    run = json.loads((tmp_path / "gpu-rehearsal.json").read_text())
    assert run["preflight"]["torch"] and run["device"] == "cpu"
    sections = run["sections"]
    assert set(sections) == {"train_single", "train_grouped", "sample"}
    for name in ("train_single", "train_grouped"):
        for row in sections[name]["runs"]:
            assert row["trainer_s"] > 0 and row["reference_s"] > 0 and row["speedup"] > 0
            assert min(row["iterations"].values()) >= 2
    assert sections["train_grouped"]["runs"][0]["methods"] == [
        "esd-x", "realera", "crce-sphere", "crce-fixed", "crce"
    ]  # fmt: skip
    assert sections["sample"]["batched_images_per_s"] > 0 and sections["sample"]["ratio"] > 0
