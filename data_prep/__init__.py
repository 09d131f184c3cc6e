"""`verl prepare-data NAME`: one module per dataset, each with DESCRIPTION, OPTIONS (the
PrepOptions fields it accepts) and build(PrepOptions) -> Splits. `prepare` checks the name and
options, builds every split in memory, then writes all files atomically.

    from data_prep import prepare
    prepare("gsm8k", source="/path/to/gsm8k", out="data/gsm8k")
"""

from __future__ import annotations

import importlib
from dataclasses import fields
from pathlib import Path

from verlcli.errors import UserError

# name -> module. Imported on use: `verl --help` must not import pyarrow or datasets.
DATASETS = {
    "gsm8k": "data_prep.gsm8k",
    "math": "data_prep.math_dataset",
    "countdown": "data_prep.countdown",
    "arithmetic": "data_prep.arithmetic",
    "arithmetic-tools": "data_prep.arithmetic_tools",
    "custom": "data_prep.custom",
}


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def prepare(name: str, out: str | Path | None = None, **options) -> dict:
    """Build dataset `name` into `out` (default data/NAME). Options left None take defaults.

    Returns {"out": Path, "files": {"train": Path, ...}, "rows": {"train": n, ...},
    "data_sources": [...], "notes": [...], "example": first train row}.
    """
    from data_prep.common import PrepOptions, check_size, write_splits

    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}",
                        fix="e.g. `verl prepare-data gsm8k`, or `verl prepare-data custom --source FILE`")
    module = importlib.import_module(DATASETS[name])
    given = {k: v for k, v in options.items() if v is not None}
    known = {f.name for f in fields(PrepOptions)}
    unknown = set(given) - known
    if unknown:
        raise TypeError(f"prepare() got unknown options {sorted(unknown)}")
    unused = sorted(set(given) - module.OPTIONS)
    if unused:
        raise UserError(f"{', '.join(map(_flag, unused))} does not apply to {name}",
                        fix=f"options for {name}: {', '.join(sorted(map(_flag, module.OPTIONS)))}")
    check_size(given.get("train_size"), "--train-size")
    check_size(given.get("test_size"), "--test-size")
    splits = module.build(PrepOptions(**given))
    if not splits.train:
        raise UserError(f"{name}: the train split came out empty", fix="check --source and --train-size")
    out = Path(out) if out else Path("data") / name
    files = write_splits(out, splits)
    rows = {"train": len(splits.train), "test": len(splits.test)}
    if splits.sft_train is not None:
        rows.update(sft_train=len(splits.sft_train), sft_test=len(splits.sft_test or []))
    rows.update({name: len(r) for name, r in splits.extra.items()})
    return {
        "out": out,
        "files": files,
        "rows": rows,
        "data_sources": sorted({r["data_source"] for r in splits.train + splits.test}),
        "notes": splits.notes,
        "example": splits.train[0],
    }
