"""The base model itself (`sd` in Table 1): nothing is erased, no erase job runs."""

from __future__ import annotations

from .base import Kind, Method


class Baseline(Method):
    """The unedited base model; its images are every method's paired baseline."""

    name = "none"
    kind = Kind.NONE
