"""A tiny name → function registry.

The config selects algorithms by name (`algorithm.adv_estimator=grpo`,
`actor.policy_loss=vanilla`, ...). A typo there must fail with one line that names the
key, the bad value and the valid choices, not with a `KeyError` deep in a worker — so
`get` raises `UserError`.
"""

from __future__ import annotations

from typing import Callable, Iterator, TypeVar

from verlcli.errors import UserError

F = TypeVar("F", bound=Callable)


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

    def register(self, name: str, *aliases: str) -> Callable[[F], F]:
        """Decorator: register `fn` under `name` and every alias."""

        def decorator(fn: F) -> F:
            for key in (name, *aliases):
                if key in self._fns and self._fns[key] is not fn:
                    raise ValueError(f"{self.what} {key!r} is already registered")
                self._fns[key] = fn
            return fn

        return decorator

    def get(self, name: str, config_key: str | None = None) -> Callable:
        """The function registered as `name`; `config_key` overrides the key named in the
        error when one registry serves several keys."""
        try:
            return self._fns[name]
        except (KeyError, TypeError):
            key = config_key or self.config_key
            raise UserError(
                f"unknown {self.what} {name!r} for {key}",
                fix=f"set {key} to one of: {', '.join(self.names())}",
            ) from None

    def names(self) -> list[str]:
        return sorted(self._fns)

    def __contains__(self, name: object) -> bool:
        return name in self._fns

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._fns)
