from __future__ import annotations

import json
import os

import pytest
from helpers import FAKE_SERVER, REPO, FinishedWorld, make_cat_split, make_workdir, snakemake

# Two cores: pin torch threads so model tests run one at a time without oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture
def fake_server(tmp_path):
    """Start the fake OpenAI server through the project's own lifecycle code."""
    from crce.serving import ManagedServer

    servers = []

    def start(
        script: list[str] | None = None, model: str = "fake", extra: str = ""
    ) -> ManagedServer:
        script_file = tmp_path / f"script{len(servers)}.json"
        script_file.write_text(json.dumps(script or []))
        command = f"{{python}} {FAKE_SERVER} --port {{port}} --model {{model}} --script {script_file} {extra}"
        server = ManagedServer(command, model, startup_timeout=30, log_path=tmp_path / "server.log")
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def workdir(tmp_path):
    return make_workdir(tmp_path)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The tiny random SD pipeline on disk, built once, loaded through from_pretrained."""
    from crce_worlds.tiny import build_tiny_pipeline

    return str(build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "tiny-sd", seed=0))


@pytest.fixture(scope="session")
def cat_split():
    return make_cat_split()


@pytest.fixture(scope="session")
def test_world(tmp_path_factory) -> FinishedWorld:
    """The tiny test world run to completion once (`all`: Table 1, figures, distances) and
    shared by every end-to-end test: they plan against it (`snakemake -n`) or read it, and
    what they add goes beside it, so each sees it as finished."""
    work = make_workdir(tmp_path_factory.mktemp("world"))
    sheet = work / "sheet.tsv"
    sheet.write_text((REPO / "tests" / "data" / "concepts.tsv").read_text())
    world = FinishedWorld(work, sheet)
    result = snakemake(work, "all", *world.args())
    assert result.returncode == 0, result.stdout[-5000:]
    return world
