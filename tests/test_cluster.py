"""What the SLURM profile gives each rule that asks for a GPU, and what the README says."""

import re

import yaml
from helpers import REPO, workflow_rules

PROFILE = yaml.safe_load((REPO / "slurm" / "config.yaml").read_text())


def asks_for_a_gpu(rule) -> bool:
    """A constant gpu > 0, or a function of the wildcards (a method's kind decides)."""
    gpu = rule.resources["gpu"] if "gpu" in rule.resources else 0
    return callable(gpu) or bool(gpu)


GPU_RULES = sorted(n for n, rule in workflow_rules().items() if asks_for_a_gpu(rule))


def test_every_rule_that_asks_for_a_gpu_has_resources_of_its_own_in_the_profile():
    assert {"erase", "erase_group", "erase_sweep", "sample", "judge"} <= set(GPU_RULES)
    resources = PROFILE["set-resources"]
    missing = [n for n in GPU_RULES if not {"mem_mb", "cpus_per_task"} <= set(resources.get(n, {}))]
    assert not missing, f"rules with a GPU but the profile's 8 GB / 2 CPU default: {missing}"


def test_the_readme_lists_each_gpu_rule_as_the_profile_sets_it():
    section = (REPO / "README.md").read_text().split("## Running on a cluster")[1]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \|(.*)$", section, re.M)}
    for name in GPU_RULES:
        assert name in rows, f"README's cluster table has no row for {name}"
        given = PROFILE["set-resources"][name]
        gb, cpus = given["mem_mb"] // 1000, given["cpus_per_task"]
        assert f"{gb} GB, {cpus} CPUs" in rows[name], (name, rows[name])
