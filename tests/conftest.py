from __future__ import annotations

import json
import os

import pytest
from helpers import FAKE_SERVER, make_cat_split, make_workdir

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
    from crce.worlds.tiny import build_tiny_pipeline

    return str(build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "tiny-sd", seed=0))


@pytest.fixture(scope="session")
def cat_split():
    return make_cat_split()
