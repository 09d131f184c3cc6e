"""A tiny name → function registry.

The config selects algorithms by name (`algorithm.adv_estimator=grpo`,
`actor.policy_loss=vanilla`, ...). A typo there must fail with one line that names the
key, the bad value and the valid choices, not with a `KeyError` deep in a worker — so
`get` raises `UserError`.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

from verlcli.errors import UserError

F = TypeVar("F", bound=Callable)


@dataclass(frozen=True)
class Needs:
    """What an entry needs from the rest of the run, declared once on its registration and
    read by the schema (`Config.use_critic`), the batch arithmetic (group size) and the
    trainer (which passes to run) — so no other module compares names."""

    critic: bool = False  # a value model (GAE)
    reference: bool = False  # reference-policy log-probs
    baseline: bool = False  # a greedy response per prompt, scored (ReMax)
    group: bool = False  # several responses per prompt (rollout.n >= 2)
    old_log_probs: bool = False  # the old policy's log-probs before advantages are computed
    sum_pi_squared: bool = False  # Σ_v π(v)² per response token from the old-policy forward


class Registry:
    """Maps names (and aliases) to functions.

    `what` is a human name for the entries ("advantage estimator"); `config_key` is the
    dotted config key that selects one ("algorithm.adv_estimator"). Both only feed the
    error message.

    A registry with `modules` is declared up front (`declare`: names and what they need,
    no torch — verlcli.algorithms.catalog) and its functions are bound when those modules
    are imported, on the first `get`; binding an undeclared name there is an error, so the
    declarations cannot drift from the code. Without `modules`, `register` alone declares.
    """

    def __init__(self, what: str, config_key: str, modules: tuple[str, ...] = ()):
        self.what = what
        self.config_key = config_key
        self._modules = modules
        self._fns: dict[str, Callable] = {}
        self._needs: dict[str, Needs] = {}

    def declare(self, name: str, *aliases: str, needs: Needs = Needs()) -> None:
        for key in (name, *aliases):
            self._needs[key] = needs

    def register(self, name: str, *aliases: str) -> Callable[[F], F]:
        """Decorator: bind `fn` to `name` and every alias."""

        def decorator(fn: F) -> F:
            for key in (name, *aliases):
                if key in self._fns and self._fns[key] is not fn:
                    raise ValueError(f"{self.what} {key!r} is already registered")
                if self._modules and key not in self._needs:
                    raise ValueError(f"{self.what} {key!r} is not declared in verlcli.algorithms.catalog")
                self._fns[key] = fn
                self._needs.setdefault(key, Needs())
            return fn

        return decorator

    def _load(self) -> None:
        for module in self._modules:
            importlib.import_module(module)

    def get(self, name: str, config_key: str | None = None) -> Callable:
        """The function registered as `name`; `config_key` overrides the key named in the
        error when one registry serves several keys."""
        if name not in self._fns:
            self._load()
        try:
            return self._fns[name]
        except (KeyError, TypeError):
            raise self.unknown(name, config_key) from None

    def needs(self, name: str, config_key: str | None = None) -> Needs:
        """What entry `name` needs (see `Needs`); an unknown name raises like `get`."""
        self.check(name, config_key)
        return self._needs[name]

    def check(self, name: str, config_key: str | None = None) -> None:
        """Raise the `get` error for an unknown name; a declared name needs no import."""
        if not (isinstance(name, str) and name in self._needs):
            self.get(name, config_key)

    def unknown(self, name, config_key: str | None = None) -> UserError:
        key = config_key or self.config_key
        close = difflib.get_close_matches(str(name), self.names(), n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return UserError(
            f"unknown {self.what} {name!r} for {key}",
            fix=f"{hint}set {key} to one of: {', '.join(self.names())}",
        )

    def names(self) -> list[str]:
        return sorted(self._needs)

    def __contains__(self, name: object) -> bool:
        return name in self._needs

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._needs)
