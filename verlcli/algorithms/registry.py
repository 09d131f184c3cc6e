"""A tiny name → function registry.

The config selects algorithms by name (`algorithm.adv_estimator=grpo`,
`actor.policy_loss=vanilla`, ...). A typo there must fail with one line that names the
key, the bad value and the valid choices, not with a `KeyError` deep in a worker — so
`get` raises `UserError`.
"""

from __future__ import annotations

import difflib
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
    """

    def __init__(self, what: str, config_key: str):
        self.what = what
        self.config_key = config_key
        self._fns: dict[str, Callable] = {}
        self._needs: dict[str, Needs] = {}

    def register(self, name: str, *aliases: str, needs: Needs = Needs()) -> Callable[[F], F]:
        """Decorator: register `fn` under `name` and every alias, with what it `needs`."""

        def decorator(fn: F) -> F:
            for key in (name, *aliases):
                if key in self._fns and self._fns[key] is not fn:
                    raise ValueError(f"{self.what} {key!r} is already registered")
                self._fns[key] = fn
                self._needs[key] = needs
            return fn

        return decorator

    def get(self, name: str, config_key: str | None = None) -> Callable:
        """The function registered as `name`; `config_key` overrides the key named in the
        error when one registry serves several keys."""
        try:
            return self._fns[name]
        except (KeyError, TypeError):
            raise self.unknown(name, config_key) from None

    def needs(self, name: str, config_key: str | None = None) -> Needs:
        """What entry `name` needs (see `Needs`); an unknown name raises like `get`."""
        self.get(name, config_key)
        return self._needs[name]

    def check(self, name: str, config_key: str | None = None) -> None:
        """Raise the `get` error for an unknown name (config load time)."""
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
        return sorted(self._fns)

    def __contains__(self, name: object) -> bool:
        return name in self._fns

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._fns)
