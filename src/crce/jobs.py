"""How the workflow hands work to its jobs (workflow/rules/common.smk): where jobs import this
package from, and the settings that travel untracked."""

from __future__ import annotations

import os
from types import SimpleNamespace

from pydantic import BaseModel


def jobs_import_from(*paths: str) -> None:
    """Make every job import from `paths` (PYTHONPATH, inherited by the scripts Snakemake
    starts, on the cluster too): envs carry third-party packages only, so an edit to src/crce
    reaches every job without rebuilding an env, and without changing an env's identity
    (which would rerun every job); a method in your own file imports from the workdir."""
    current = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in (*paths, *current) if p))


def untracked(settings: BaseModel) -> SimpleNamespace:
    """Knobs that change no result, for a rule's params: Snakemake's params trigger records
    builtins only (snakemake.persistence), so a SimpleNamespace never causes a rerun. The job
    rebuilds the settings object with `Model(**vars(namespace))`."""
    return SimpleNamespace(**settings.model_dump(mode="json"))
