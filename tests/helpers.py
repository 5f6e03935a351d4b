"""Paths, test data and the Snakemake runner shared by tests and benchmarks (no pytest here:
benchmarks import it too)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
COREFCONCEPT = SHARED / "CorefConcept"
FAKE_SERVER = REPO / "tests" / "fake_openai_server.py"


def make_cat_split():
    """A 'cat' split with 10/5 corefs and retains at every certainty level."""
    from crce.lists import Certainty, ConceptLists, Item, Provenance
    from crce.split import make_split

    levels = list(Certainty)
    lists = ConceptLists(
        concept="cat",
        id="cat",
        category="object",
        corefs=[Item(text=f"kitty number {i}", certainty=levels[i // 3]) for i in range(15)],
        retains=[Item(text=f"dog breed {i}", certainty=levels[i // 3]) for i in range(15)],
        provenance=Provenance(source="llm"),
    )
    return make_split(lists, seed=0)


def workflow_rules() -> dict:
    """Every rule of the workflow as Snakemake reads it (name -> snakemake Rule), loaded once
    with the paper's config and once with the test world's, so rules defined under an `if`
    (erase_group, erase_sweep, features_model) are there too."""
    import tempfile

    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, ResourceSettings

    found = {}
    # Kept for the process: the workflow puts its src/ on sys.path.
    tmp = Path(tempfile.mkdtemp(prefix="crce-rules-"))
    for overlay in ([], [Path("config/test.yaml")]):
        work = make_workdir(tmp / f"w{len(overlay)}")
        with SnakemakeApi() as api:
            workflow = api.workflow(
                resource_settings=ResourceSettings(),
                config_settings=ConfigSettings(configfiles=overlay),
                snakefile=work / "Snakefile",
                workdir=work,
            )
            found.update({rule.name: rule for rule in workflow._workflow.rules})
    return found


def make_workdir(tmp_path: Path) -> Path:
    """A fresh working directory with the workflow linked in (results/ and logs/ stay local)."""
    work = tmp_path / "work"
    work.mkdir(parents=True, exist_ok=True)
    for name in (
        "Snakefile",
        "workflow",
        "config",
        "src",
        "tests",
        "resources",
        "envs",
        "profiles",
    ):
        target = work / name
        if not target.exists():
            target.symlink_to(REPO / name)
    return work


def snakemake(
    work: Path, *args: str, timeout: float = 1200, env: dict | None = None
) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "snakemake"
    return subprocess.run(
        [str(exe), "--cores", "2", *args],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        env=env,
    )


def planned(output: str) -> dict[str, int]:
    """Jobs per rule from the 'Job stats' table of a (dry) run."""
    table = output.split("Job stats:")[1].split("\n\n")[0]
    counts = {}
    for line in table.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    return counts


@dataclass
class FinishedWorld:
    """A finished run of the tiny test world (the session fixture `test_world`)."""

    work: Path
    sheet: Path

    def args(self, sheet: Path | None = None, **overlay) -> list[str]:
        """Snakemake arguments for this world, with `overlay` deep-merged over the config."""
        files = ["config/test.yaml"]
        if overlay:
            extra = self.work / f"overlay-{abs(hash(repr(sorted(overlay.items()))))}.yaml"
            extra.write_text(yaml.safe_dump(overlay))
            files.append(str(extra))
        return ["--configfile", *files, "--config", f"concepts={sheet or self.sheet}"]

    def copy(self, folder: Path) -> FinishedWorld:
        """A copy to change (new methods, a sweep) without touching the shared world."""
        import shutil

        shutil.copytree(self.work, folder, symlinks=True)
        return FinishedWorld(folder, folder / self.sheet.name)

    def subset(self, *concepts: str) -> Path:
        """A sheet of only these concepts (display text): a test that adds jobs per concept
        runs them on what its assertions read (each job costs seconds of imports on 2 cores)."""
        header, *rows = self.sheet.read_text().splitlines()
        kept = [row for row in rows if row.split("\t")[0] in concepts]
        assert len(kept) == len(concepts), f"not all of {concepts} are in {self.sheet}"
        sheet = self.work / f"subset-{'-'.join(sorted(concepts))}.tsv".replace(" ", "_")
        sheet.write_text("\n".join([header, *kept]) + "\n")
        return sheet

    def plan(self, target: str = "all", sheet: Path | None = None, **overlay) -> dict[str, int]:
        """Jobs per rule a dry run plans (empty when there is nothing to be done)."""
        result = snakemake(self.work, "-n", target, *self.args(sheet, **overlay))
        assert result.returncode == 0, result.stdout[-3000:]
        return {} if "Nothing to be done" in result.stdout else planned(result.stdout)
