"""Models: a name (local directory, built-in, hub id) → a local Hugging Face directory."""

from verlcli.models.builtin import BUILTINS, ensure_builtin, verl_home
from verlcli.models.resolve import resolve_model

__all__ = ["BUILTINS", "ensure_builtin", "resolve_model", "verl_home"]
