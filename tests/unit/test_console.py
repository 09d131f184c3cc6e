"""The console a person reads: one compact metrics line per step, and worker / vLLM output
routed to RUN_DIR/logs/ (the whole run is checked in tests/e2e/test_rl.py)."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

from verlcli.config.loader import load_config
from verlcli.distributed.logs import LOG_DIR_ENV, log_path, route_library_logs
from verlcli.trainer.loggers import Tracker, console_line
from verlcli.trainer.setup import worker_env

REPO = Path(__file__).resolve().parents[2]


def test_console_line_is_compact_and_skips_empty_steps():
    m = {"score/mean": 0.25, "val/score/mean": 0.3125, "response/length_mean": 45.17, "actor/entropy": 1.2345,
         "actor/kl_loss": 0.00123, "actor/ppo_kl": 9.0, "timing/step_s": 3.21, "actor/pg_clipfrac": 0.1}
    assert console_line(3, m) == "step 3  reward 0.250  val 0.312  len 45.2  entropy 1.234  kl 0.0012  s 3.2"
    assert console_line(0, {"sync/gbps": 1.0, "sync/seconds": 0.2}) is None
    sft = console_line(7, {"train/loss": 1.5, "train/lr": 1e-5, "perf/tokens_per_s": 812.4, "timing/step_s": 0.5})
    assert sft == "step 7  loss 1.5000  lr 1e-05  tok/s 812  s 0.5"


def test_tracker_prints_one_line_per_step(tmp_path, capsys):
    t = Tracker(str(tmp_path), ["console", "jsonl"], "p", "n", {})
    t.log(0, {"sync/gbps": 1.0})
    for step in (1, 2, 3):
        t.log(step, {"score/mean": 0.5, "timing/step_s": 1.0, **{f"x/{i}": float(i) for i in range(40)}})
    t.close()
    out = capsys.readouterr()
    lines = [ln for ln in (out.out + out.err).splitlines() if ln.strip()]
    assert lines == [f"step {s}  reward 0.500  s 1.0" for s in (1, 2, 3)]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4  # everything is still in the file


def test_workers_log_to_run_dir_unless_verbose(tmp_path):
    cfg = load_config(preset="tiny-cpu", overrides=[f"trainer.run_dir={tmp_path / 'run'}"])
    assert worker_env(cfg, "cpu")[LOG_DIR_ENV] == str((tmp_path / "run" / "logs").resolve())
    verbose = load_config(preset="tiny-cpu", overrides=[f"trainer.run_dir={tmp_path / 'run'}", "logging.verbose=true"])
    assert LOG_DIR_ENV not in worker_env(verbose, "cpu")


def test_a_redirected_worker_process_writes_nothing_to_the_console(tmp_path):
    """What a Ray worker does in _WorkerHost.start: fds 1 and 2 (Python, logging, C level) to its file."""
    code = textwrap.dedent(f"""
        import logging, os, sys
        os.environ[{LOG_DIR_ENV!r}] = {str(tmp_path)!r}
        from verlcli.distributed.logs import log_path, redirect_process_output
        redirect_process_output(log_path("actor", 1))
        print("from print")
        logging.basicConfig(stream=sys.stdout)
        logging.getLogger("vllm.engine").warning("from the vllm logger")
        os.write(2, b"from C-level stderr\\n")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and r.stderr == ""
    text = (tmp_path / "actor_rank1.log").read_text()
    for needle in ("from print", "from the vllm logger", "from C-level stderr"):
        assert needle in text


def test_in_process_workers_route_the_vllm_logger_to_a_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(LOG_DIR_ENV, str(tmp_path))
    monkeypatch.delenv("VLLM_CONFIGURE_LOGGING", raising=False)  # route_library_logs sets it; restored after
    logger = logging.getLogger("vllm")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    try:
        route_library_logs(log_path("actor", "local"))
        logging.getLogger("vllm.model_executor").warning("RotaryEmbedding: Failed to load weights")
        out = capsys.readouterr()
        assert "RotaryEmbedding" not in out.out + out.err
        assert "RotaryEmbedding" in (tmp_path / "actor_local.log").read_text()
    finally:
        for h in list(logger.handlers):
            logger.removeHandler(h)
            h.close()
        for h in saved[0]:
            logger.addHandler(h)
        logger.setLevel(saved[1])
        logger.propagate = saved[2]
        logging.captureWarnings(False)
        pw = logging.getLogger("py.warnings")
        for h in list(pw.handlers):
            pw.removeHandler(h)
        pw.propagate = True


def test_verbose_flag_sets_logging_verbose():
    from verlcli.commands.train import resolve

    assert resolve("grpo", "tiny-cpu", None, ["logging.verbose=true"]).logging.verbose is True
    r = subprocess.run([sys.executable, "-m", "verlcli.cli", "grpo", "--help"], capture_output=True, text=True,
                       cwd=REPO, timeout=60)
    assert "--verbose" in r.stdout and "RUN_DIR/logs" in r.stdout


def test_output_to_is_temporary(tmp_path):
    """The local launcher's set-up: fds 1/2 to the log inside the block, the console after."""
    code = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from verlcli.distributed.logs import output_to
        with output_to(Path({str(tmp_path / 'a_local.log')!r})):
            print("inside", flush=True)
            os.write(2, b"inside C\\n")
        print("after")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "after\n" and r.stderr == ""
    assert (tmp_path / "a_local.log").read_text() == "inside\ninside C\n"
