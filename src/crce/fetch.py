"""Fetch a pinned file (a URL, or a local path) and check its sha256: what the `download`
target does on the login node for the data the jobs then read offline."""

from __future__ import annotations

import hashlib
import logging
import urllib.error
import urllib.request
from pathlib import Path

from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

log = logging.getLogger(__name__)


class FetchError(ValueError):
    """A file that cannot be had or that is not the pinned one; the message names it."""


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://", "file://"))


def _transient(err: BaseException) -> bool:
    code = getattr(err, "code", None)
    return isinstance(err, urllib.error.URLError) and (code is None or code == 429 or code >= 500)


@retry(
    retry=retry_if_exception(_transient),
    stop=stop_after_attempt(4),
    wait=wait_exponential(multiplier=1, max=20),
    reraise=True,
)
def _get(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def fetch_file(
    source: str, sha256: str | None, output: str | Path, what: str, timeout: float = 120.0
) -> str:
    """Copy `source` (URL or path) to `output`, written only once its sha256 matches the
    pinned one (when given); returns the sha256 (logged either way)."""
    try:
        data = _get(source, timeout) if is_url(source) else Path(source).read_bytes()
    except urllib.error.HTTPError as err:
        raise FetchError(f"{what}: {source} answered HTTP {err.code}") from None
    except (urllib.error.URLError, OSError) as err:
        raise FetchError(f"{what}: cannot read {source} ({getattr(err, 'reason', err)})") from None
    digest = hashlib.sha256(data).hexdigest()
    if sha256 and digest != sha256:
        raise FetchError(
            f"{what}: sha256 {digest} differs from the pinned {sha256}; {source} is not "
            "the pinned file"
        )
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(output.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(output)
    log.info("%s: %s, %d bytes, sha256 %s", what, source, len(data), digest)
    return digest
