"""The one client/server layer for OpenAI-compatible model servers (LLM, vLLM judge, fakes,
toy servers): the client, the errors worth retrying, and a server's lifecycle.

Convention shared by every server: the command is a template with `{port}` and `{model}`
(and `{python}`, this interpreter) placeholders; the job picks a free port on 127.0.0.1,
starts the command in its own process group, waits until `GET /health` answers (vLLM's, which
needs no key) and `GET /v1/models` answers with the key the config names (a started vLLM
inherits `VLLM_API_KEY` and then wants it on `/v1`), restarts it once if it dies mid-run, and
kills the whole group when done.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import openai

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors a retry (or a restarted server) can cure: refused connections and timeouts, 429, 5xx.
TRANSIENT = (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError)


def unreachable(err: openai.APIConnectionError, base_url: str | None, what: str):
    """The same connection error, its message naming the endpoint (never the key)."""
    where = base_url or "the default OpenAI endpoint"
    return openai.APIConnectionError(
        message=f"no {what} answered at {where} ({err})", request=err.request
    )


def openai_client(
    base_url: str | None, *, api_key_env: str, timeout: float, asynchronous: bool = False
):
    """A client for `base_url` (None: OpenAI's own endpoint). Retries are the caller's (tenacity),
    so the client makes none. The key is read here and handed to the client only: it is never
    logged or written."""
    api_key = os.environ.get(api_key_env) or "EMPTY"
    cls = openai.AsyncOpenAI if asynchronous else openai.OpenAI
    return cls(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=0)


class ServerError(RuntimeError):
    """A server that exited, or did not answer before its deadline."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def render_command(template: str, *, port: int, model: str) -> str:
    return template.format(port=port, model=model, python=shlex.quote(sys.executable))


def _status(url: str, api_key: str | None = None, timeout: float = 2.0) -> int | None:
    """The HTTP status of GET `url` (with the key as a bearer token), None when nothing answers."""
    request = urllib.request.Request(url)
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ManagedServer:
    """One OpenAI-compatible server process; `start()` returns its base URL."""

    def __init__(
        self,
        command: str,
        model: str,
        *,
        startup_timeout: float = 600.0,
        log_path: str | Path | None = None,
        api_key_env: str | None = None,
    ):
        self.command_template = command
        self.model = model
        self.api_key_env = api_key_env
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_path) if log_path else None
        self.process: subprocess.Popen | None = None
        self.base_url: str | None = None
        self.starts = 0

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> str:
        port = free_port()
        command = render_command(self.command_template, port=port, model=self.model)
        output = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        log.info("starting server: %s", command)
        self.process = subprocess.Popen(
            command,
            shell=True,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() kills children too
        )
        if output is not subprocess.DEVNULL:
            output.close()
        self.starts += 1
        root = f"http://127.0.0.1:{port}"
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(
                    f"server exited with code {self.process.returncode} before answering: "
                    f"{command}{self._log_tail()}"
                )
            health = _status(f"{root}/health")
            if health is not None and (health < 300 or health == 404):  # up (or no /health)
                status = _status(f"{root}/v1/models", key)
                if status in (401, 403):
                    self.stop()
                    raise ServerError(
                        f"the server at {root} wants an API key: set {self.api_key_env} to the "
                        "key it expects (the variable the config's `api_key_env` names; a "
                        "started vLLM takes VLLM_API_KEY from the environment)"
                    )
                if status is not None and status < 300:
                    self.base_url = f"{root}/v1"
                    log.info("server ready at %s", self.base_url)
                    return self.base_url
            time.sleep(0.25)
        self.stop()
        raise ServerError(
            f"server did not answer GET /v1/models within {self.startup_timeout:.0f} s: "
            f"{command}{self._log_tail()}"
        )

    def stop(self) -> None:
        """Terminate the whole process group and wait until every member is gone."""
        if self.process is None:
            return
        group = self.process.pid
        for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and _group_alive(group):
                self.process.poll()  # reap the direct child
                time.sleep(0.05)
            if not _group_alive(group):
                break
        self.process.poll()
        self.process = None

    def restart(self) -> str:
        self.stop()
        return self.start()

    def _log_tail(self, lines: int = 20) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return "\nlast server output:\n" + "\n".join(tail)


def call_served(
    work: Callable[[str | None], T], *, runtime, model: str, log_path: str | Path | None = None
) -> T:
    """Run `work(base_url)` against the endpoint of `runtime` (an LlmRuntime or JudgeRuntime):
    its `base_url` when it has no `serve` command, else a server started for the job. A
    server that dies mid-run is restarted once and `work` is called again (it must skip what
    it already finished); the server is always stopped."""
    if not runtime.serve:
        return work(runtime.base_url)
    server = ManagedServer(runtime.serve, model, startup_timeout=runtime.startup_timeout,
                           log_path=log_path, api_key_env=runtime.api_key_env)  # fmt: skip
    try:
        url = server.start()
        try:
            return work(url)
        except TRANSIENT:
            if server.alive:
                raise
            log.warning("the server died mid-run; restarting it once for the unfinished work")
            return work(server.restart())
    finally:
        server.stop()
