"""Every rule that runs code names a pinned conda env that can run it.

Envs carry third-party packages only (jobs import crce from the checkout, common.smk): a test
follows every script's imports through crce, lazy ones included, and checks each third-party
module against the env its rule names; another resolves every env with pip for the cluster's
platform, so an env that cannot be built fails CI.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import json
import re
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path

import pytest
import yaml
from helpers import REPO, workflow_rules
from packaging.requirements import Requirement

ENVS = sorted((REPO / "envs").glob("*.yaml"))
SRC = REPO / "src"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# What each script gets without its env: the preamble Snakemake writes imports snakemake.
PROVIDED = {"snakemake", "crce"}


def rules() -> list[tuple[str, str, Path | None, Path | None, bool]]:
    """(smk file, rule, env file, script, runs code) of every rule, as Snakemake itself reads
    the workflow (helpers.workflow_rules: rules under an `if` included)."""
    found = []
    for rule in workflow_rules().values():
        base = Path(rule.snakefile).resolve().parent
        env = (base / rule.conda_env).resolve() if rule.conda_env else None
        script = (base / rule.script).resolve() if rule.script else None
        runs = not rule.norun  # a script, a shell command or a run block
        found.append((Path(rule.snakefile).name, rule.name, env, script, runs))
    return sorted(found, key=lambda r: (r[0], r[1]))


def env_requirements(env: Path) -> list[Requirement]:
    spec = yaml.safe_load(env.read_text())
    pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict))
    return [Requirement(r) for r in pip]


def _module_file(module: str) -> Path | None:
    parts = module.split(".")
    base = SRC.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports_of(path: Path, package: str | None = None) -> set[str]:
    """Top-level third-party modules `path` imports, lazily or not, following crce modules."""
    seen: set[Path] = set()
    found: set[str] = set()

    def visit(file: Path, package: str | None) -> None:
        if file in seen:
            return
        seen.add(file)
        for node in ast.walk(ast.parse(file.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against the module's package
                    base = (package or "").split(".")
                    base = base[: len(base) - node.level + 1]
                    stem = ".".join([*base, node.module] if node.module else base)
                    names = [stem] + [f"{stem}.{a.name}" for a in node.names]
                else:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                top = name.split(".")[0]
                if top == "crce":
                    target = _module_file(name)
                    if target:
                        is_pkg = target.name == "__init__.py"
                        visit(target, name if is_pkg else name.rpartition(".")[0])
                elif top not in sys.stdlib_module_names and top != "__future__":
                    found.add(top)

    visit(path, package)
    return found


@cache
def distribution_of() -> dict[str, list[str]]:
    return md.packages_distributions()


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(names: list[str]) -> set[str]:
    """The distributions and, through installed metadata, everything they require."""
    todo, done = [normalise(n) for n in names], set()
    while todo:
        name = todo.pop()
        if name in done:
            continue
        done.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue  # not installed here (vllm): only what the env lists counts
        for text in requires:
            req = Requirement(text)
            if req.marker and not req.marker.evaluate({"extra": ""}):
                continue
            todo.append(normalise(req.name))
    return done


RULES = rules()


@pytest.mark.parametrize("smk, name, env, script, runs", RULES, ids=[r[1] for r in RULES])
def test_every_rule_that_runs_code_names_an_env(smk, name, env, script, runs):
    if runs:
        assert env, f"{smk}: rule {name} runs code without a conda env"
        assert env.is_file(), env


SCRIPTED = [r for r in RULES if r[3]]


@pytest.mark.parametrize("smk, name, env, script, runs", SCRIPTED, ids=[r[1] for r in SCRIPTED])
def test_every_import_of_a_job_is_in_its_env(smk, name, env, script, runs):
    needed = imports_of(script) - PROVIDED
    assert needed, f"{script.name} imports nothing third-party: the test would prove nothing"
    available = closure([r.name for r in env_requirements(env)])
    missing = []
    for module in sorted(needed):
        dists = distribution_of().get(module)
        assert dists, f"{module} (imported by {script.name}) is not installed here"
        if not {normalise(d) for d in dists} & available:
            missing.append(f"{module} ({', '.join(dists)})")
    assert not missing, f"rule {name} ({env.name}) imports {', '.join(missing)}"


def test_the_tracer_sees_lazy_imports():
    """download.py imports huggingface_hub inside a function of crce.download."""
    assert "huggingface_hub" in imports_of(REPO / "workflow" / "scripts" / "download.py")
    assert "diffusers" in imports_of(REPO / "workflow" / "scripts" / "sample.py")


def project_ranges() -> dict[str, Requirement]:
    ranges = {}
    for text in PYPROJECT["project"]["dependencies"] + [
        r for extra in PYPROJECT["project"]["optional-dependencies"].values() for r in extra
    ]:
        req = Requirement(text)
        ranges[normalise(req.name)] = req
    return ranges


@pytest.mark.parametrize("env", ENVS, ids=lambda p: p.name)
def test_env_pins_third_party_packages_within_the_projects_ranges(env):
    spec = yaml.safe_load(env.read_text())
    conda = [d for d in spec["dependencies"] if isinstance(d, str)]
    assert any(d.startswith("python=3.11") for d in conda)
    pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict))
    assert not any(r.startswith((".", "/")) for r in pip), (
        "envs carry third-party packages only: jobs import crce from the checkout"
    )
    ranges = project_ranges()
    for req in env_requirements(env):
        pins = [s for s in req.specifier if s.operator == "=="]
        assert len(pins) == 1, f"{env.name}: {req} is not pinned"
        project = ranges.get(normalise(req.name))
        if project and not (env.name == "judge.yaml" and req.name == "torch"):  # vLLM's own
            assert project.specifier.contains(pins[0].version), (
                f"{env.name}: {req} outside pyproject's {project}"
            )


def test_pyproject_declares_ranges_not_pins():
    """A library's dependencies are ranges; exact pins belong in the envs (and constraints)."""
    for req in project_ranges().values():
        if req.name in ("ruff", "snakefmt"):
            continue  # formatters: a new release reformats the tree
        assert not any(s.operator == "==" for s in req.specifier), req


# A Linux x86-64 cluster with glibc 2.35 (Ubuntu 22.04; RHEL 9 has 2.34): pip matches
# manylinux tags one by one, so every compatible one is listed.
CLUSTER_PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(17, 36)] + [
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]


def resolve(requirements: list[str], python: str) -> subprocess.CompletedProcess:
    """pip's resolver for a Linux x86-64 cluster and `python`, against the registry, with no
    install: what `--conda-create-envs-only` would do for the env's pip section."""
    platforms = [arg for p in CLUSTER_PLATFORMS for arg in ("--platform", p)]
    return subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
         "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
         *platforms, "--quiet", "--report", "-", *requirements],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("env", ENVS, ids=lambda p: p.name)
def test_env_resolves_for_the_cluster(env):
    result = resolve([str(r) for r in env_requirements(env)], "3.11")
    assert result.returncode == 0, f"{env.name} cannot be built:\n{result.stderr[-3000:]}"
    installed = {i["metadata"]["name"].lower() for i in json.loads(result.stdout)["install"]}
    assert {normalise(r.name) for r in env_requirements(env)} <= {normalise(n) for n in installed}
