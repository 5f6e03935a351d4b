"""Fetch model weights into the Hugging Face cache on a host with internet (login node)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def download(repos: list[str]) -> None:
    """Snapshot each hub repo (local folders are skipped); the token comes from HF_TOKEN."""
    from huggingface_hub import snapshot_download

    for repo in repos:
        if Path(repo).exists():
            log.info("%s is a local folder: nothing to download", repo)
            continue
        log.info("downloading %s into %s", repo, os.environ.get("HF_HOME", "~/.cache/huggingface"))
        # The token is read by huggingface_hub from HF_TOKEN; it is never logged here.
        path = snapshot_download(
            repo, allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"]
        )
        log.info("%s ready at %s", repo, path)
