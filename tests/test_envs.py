"""Every rule that runs code names a pinned conda env that agrees with pyproject.toml."""

import re
import tomllib

import pytest
import yaml
from helpers import REPO

ENVS = sorted((REPO / "envs").glob("*.yaml"))
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def pins_of(requirements: list[str]) -> dict[str, str]:
    pins = {}
    for req in requirements:
        match = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^;\s]+)$", req.strip())
        if match:
            pins[match.group(1).lower()] = match.group(3)
    return pins


PROJECT_PINS = pins_of(PYPROJECT["project"]["dependencies"])
for extra in PYPROJECT["project"]["optional-dependencies"].values():
    PROJECT_PINS |= pins_of(extra)


def rules():
    for path in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        for block in re.split(r"\n(?=rule )", path.read_text()):
            if block.startswith("rule "):
                yield path.name, block.split(":")[0].split()[1], block


@pytest.mark.parametrize(
    "smk, name, block", list(rules()), ids=lambda x: x if isinstance(x, str) and len(x) < 40 else ""
)
def test_every_rule_that_runs_code_names_an_env(smk, name, block):
    if re.search(r"^\s+(script|shell|run):", block, re.M):
        env = re.search(r"^\s+conda:\s*\n\s+\"([^\"]+)\"", block, re.M)
        assert env, f"{smk}: rule {name} runs code without a conda env"
        assert (REPO / "workflow" / "rules" / env.group(1)).resolve().is_file()


@pytest.mark.parametrize("env", ENVS, ids=lambda p: p.name)
def test_env_parses_pins_and_agrees_with_pyproject(env):
    spec = yaml.safe_load(env.read_text())
    conda = [d for d in spec["dependencies"] if isinstance(d, str)]
    assert any(d.startswith("python=3.11") for d in conda)
    pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict))
    local = [r for r in pip if r.startswith("../..")]
    assert local, (
        "the env must install this package from the repo root (../.. from .snakemake/conda)"
    )
    assert not any(r.startswith("/") for r in pip), "absolute paths break on other machines"
    others = [r for r in pip if not r.startswith("../..")]
    pins = pins_of(others)
    assert len(pins) == len(others), f"unpinned requirement in {env.name}: {others}"
    for package, version in pins.items():
        if env.name == "judge.yaml" and package == "torch":
            continue  # vLLM pins its own torch
        if package in PROJECT_PINS:
            assert version == PROJECT_PINS[package], (
                f"{env.name}: {package}=={version}, pyproject has {PROJECT_PINS[package]}"
            )
