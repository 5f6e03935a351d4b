"""How the workflow hands work to its jobs (workflow/rules/common.smk): where jobs import this
package from, and the settings that travel untracked."""

from __future__ import annotations

import os
import sys
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


# A job ends with the Snakemake process that started it (issue: a `kill -9` of Snakemake left
# its jobs running, writing into outputs the next run writes too): Snakemake's pid is handed
# to every job, whose watchdog stops the job when that process is gone.
PARENT_ENV = "CRCE_SNAKEMAKE_PID"


def hand_parent_to_jobs() -> None:
    """Called at parse time: jobs inherit this Snakemake's pid (on a cluster, the job's own
    Snakemake parses the workflow again and hands over its own)."""
    os.environ[PARENT_ENV] = str(os.getpid())


def watch_parent(poll: float = 1.0, grace: float = 30.0) -> None:
    """Stop this job when the Snakemake that started it is gone: KeyboardInterrupt in the
    main thread (so servers a job started are stopped in its `finally`s), then, if the job is
    stuck in a long call, a hard exit after `grace` seconds."""
    import _thread
    import logging
    import threading
    import time

    pid = int(os.environ.get(PARENT_ENV) or 0)
    if not pid or pid == os.getpid():
        return

    def alive() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def watch() -> None:
        while alive():
            time.sleep(poll)
        logging.getLogger("crce").error("Snakemake (pid %d) is gone: stopping this job", pid)
        _thread.interrupt_main()
        time.sleep(grace)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def writable_or_error(folder: str) -> str | None:
    """One line when the workflow cannot write `folder` (or create it), else None."""
    from pathlib import Path

    path = Path(folder)
    existing = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
    if not os.access(existing, os.W_OK | os.X_OK):
        return (
            f"{existing.resolve()} is not writable: the workflow writes its outputs to "
            f"{path.resolve()}; fix its permissions or run from a folder you can write"
        )
    return None


def conda_missing(deployment_methods, argv: list[str]) -> str | None:
    """With `--sdm conda` and no conda or mamba on PATH: None for a dry run (the caller plans
    it without the envs: a plan needs none), else the one line that says what to do."""
    import shutil

    from snakemake.settings.types import DeploymentMethod

    if DeploymentMethod.CONDA not in deployment_methods:
        return None
    if shutil.which("conda") or shutil.which("mamba"):
        return None
    if is_dry_run(argv):
        deployment_methods.discard(DeploymentMethod.CONDA)
        print("conda not found: this dry run plans without the envs", file=sys.stderr)
        return None
    return (
        "--software-deployment-method conda (the SLURM profile's) needs conda or mamba on PATH: "
        "install Miniforge (https://conda-forge.org/download) on the login node and build the "
        "envs there (`--conda-create-envs-only`), or run without conda"
    )


def is_dry_run(argv: list[str]) -> bool:
    """-n, --dry-run or --dryrun among Snakemake's arguments (also in a cluster of short
    flags such as -np)."""
    for arg in argv:
        if arg in ("--dry-run", "--dryrun"):
            return True
        if (
            arg.startswith("-")
            and not arg.startswith("--")
            and "n" in arg[1:]
            and arg[1:].isalpha()
        ):
            return True
    return False
