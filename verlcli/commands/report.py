"""`verl report RUN_DIR [RUN_DIR ...]`: PNG curves from metrics.jsonl."""

from typing import List, Optional

import typer


def command(
    run_dirs: List[str] = typer.Argument(..., help="One or more run directories (overlaid)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output folder (default RUN_DIR/plots)."),
):
    """Plot reward, validation reward, response length, KL, entropy and time per phase.

    Examples:

      verl report runs/smollm2-135m-cpu

      verl report runs/seed1 runs/seed2 --out plots/   # overlay two runs
    """
    from verlcli.report import make_report

    for p in make_report(run_dirs, out):
        print(p)
