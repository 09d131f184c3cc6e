"""User reward functions given as `path/to/file.py:function` (like verl's custom_reward_function).

The file is loaded by path with importlib (it need not be on sys.path or be a package).
`path.py` alone means the function `compute_score`, verl's default name. The function is
called positionally as fn(data_source, response, ground_truth, extra_info), so verl-style
functions named (data_source, solution_str, ground_truth, extra_info) work unchanged.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable

from verlcli.errors import UserError

DEFAULT_NAME = "compute_score"


def split_spec(spec: str) -> tuple[Path, str]:
    """'dir/file.py:fn' -> (absolute path, 'fn'). A Windows drive colon is not a separator."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path or "/" in name or "\\" in name or name.endswith(".py"):
        path, name = spec, DEFAULT_NAME
    return Path(path).expanduser().resolve(), name


def load_user_fn(spec: str) -> Callable:
    """Import the function named by `spec` ('path.py:name'); UserError if file or name is missing."""
    path, name = split_spec(spec)
    if not path.is_file():
        raise UserError(
            f"reward function file {str(path)!r} (from {spec!r}) does not exist",
            fix="give reward.fn as path/to/file.py:function_name, with the path relative to where you run verl",
        )
    # A stable, path-derived module name: two files both called reward.py don't collide.
    mod_name = f"verl_user_reward_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
    module = sys.modules.get(mod_name)
    if module is None:
        file_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(file_spec)
        try:
            file_spec.loader.exec_module(module)
        except Exception as e:
            raise UserError(
                f"importing reward function file {str(path)!r} failed: {type(e).__name__}: {e}",
                fix="run `python {}` to see the full error and fix the file".format(path),
            ) from e
        sys.modules[mod_name] = module
    fn = getattr(module, name, None)
    if not callable(fn):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise UserError(
            f"reward function file {str(path)!r} has no function {name!r} (functions there: {', '.join(found) or 'none'})",
            fix=f"use reward.fn={path}:NAME with one of those names",
        )
    return fn
