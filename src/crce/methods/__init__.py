"""The method registry: a config `strategy` names a method class.

A built-in name (`BUILTIN`) or `module:Class` for a method defined outside this package (your
own file, importable from the workflow's directory or the env): it runs through the same
rules, engine, sampler and judge, with its own settings model validated like the built-ins'.
Adding a built-in is a module with its class and one line here.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from ..plugins import PluginError, is_path, load_object
from .base import (
    KIND_RESOURCES,
    ClosedFormMethod,
    IterativeMethod,
    IterativeSettings,
    Kind,
    Method,
    MethodSettings,
    ReferenceRequest,
    Sampling,
)

__all__ = [
    "BUILTIN",
    "ClosedFormMethod",
    "IterativeMethod",
    "IterativeSettings",
    "KIND_RESOURCES",
    "Kind",
    "Method",
    "MethodError",
    "MethodSettings",
    "ReferenceRequest",
    "Sampling",
    "is_path",
    "load",
    "parse",
    "source_sha256",
]

# strategy -> "module:Class", imported on first use (no torch at the Snakefile's parse time).
BUILTIN = {
    "none": "crce.methods.none:Baseline",
    "esd": "crce.methods.esd:Esd",
    "crce": "crce.methods.crce_lists:Lists",
    "sphere": "crce.methods.sphere:Sphere",
    "realera": "crce.methods.realera:RealEra",
    "uce": "crce.methods.uce:Uce",
    "external": "crce.methods.external:External",
    "sld": "crce.methods.sld:Sld",
    "rece": "crce.methods.rece:Rece",
    "speed": "crce.methods.speed:Speed",
    "spm": "crce.methods.spm:Spm",
    "ca": "crce.methods.ca:ConceptAblation",
    "salun": "crce.methods.salun:Salun",
    "mace": "crce.methods.mace:Mace",
    "fmn": "crce.methods.fmn:ForgetMeNot",
}


class MethodError(ValueError):
    """A strategy that names no method; the message names the path and what is wrong."""


def load(strategy: str) -> type[Method]:
    """The method class a strategy names (a built-in, or `module:Class`)."""
    target = BUILTIN.get(strategy)
    if target is None and not is_path(strategy):
        known = ", ".join(BUILTIN)
        raise MethodError(
            f"unknown strategy {strategy!r} (a built-in: {known}; or `module:Class` for a "
            "method in your own file)"
        )
    try:
        cls = load_object(target or strategy, "method")
    except PluginError as err:
        raise MethodError(str(err)) from None
    if not (isinstance(cls, type) and issubclass(cls, Method)) or not hasattr(cls, "kind"):
        raise MethodError(
            f"{strategy!r} is not a method: expected a subclass of crce.methods.Method "
            "(IterativeMethod, ClosedFormMethod, ...), got "
            f"{type(cls).__name__ if not isinstance(cls, type) else cls.__name__}"
        )
    if not issubclass(cls.Settings, MethodSettings):
        raise MethodError(f"{strategy!r}: its Settings must subclass crce.methods.MethodSettings")
    return cls


def parse(params: dict) -> tuple[type[Method], MethodSettings]:
    """A method's class and settings from its params (the strategy says which)."""
    cls = load(params["strategy"])
    return cls, cls.Settings(**params)


def source_sha256(strategy: str) -> str | None:
    """The digest of a method's own source file (None for a built-in): a param of its jobs,
    so editing the file reruns them and nothing else."""
    if not is_path(strategy):
        return None
    spec = importlib.util.find_spec(strategy.split(":")[0])
    if spec is None or not spec.origin:
        raise MethodError(f"{strategy!r}: cannot find its source file")
    return hashlib.sha256(Path(spec.origin).read_bytes()).hexdigest()
