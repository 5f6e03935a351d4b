"""Objects named in the config by `module:attr` (a method, a feature encoder, a second judge,
a model builder): importable from the workflow's directory or the env, so a small world or a
lab's own code plugs in where a built-in would, with no edit of this package."""

from __future__ import annotations

import importlib
import re

_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class PluginError(ValueError):
    """A `module:attr` that names nothing usable; the message names the path."""


def is_path(text: str) -> bool:
    return bool(_PATH.match(text))


def load_object(path: str, what: str = "object"):
    """The attribute `attr` of module `module` for `path` = `module:attr`."""
    if not is_path(path):
        raise PluginError(f"{path!r} is not a `module:attr` path to a {what}")
    module_name, attribute = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise PluginError(
            f"{path!r}: cannot import module {module_name!r} ({err}); it must be importable "
            "from the workflow's directory or the env"
        ) from None
    found = getattr(module, attribute, None)
    if found is None:
        raise PluginError(f"{path!r}: module {module_name!r} has no attribute {attribute!r}")
    return found
