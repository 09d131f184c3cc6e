"""Checkpoints you can trust: temp dir → manifest (sizes + sha256) last → rename; resume=auto
never reads a half-written or damaged checkpoint; keep-last-k; a full disk (RLIMIT_FSIZE in
a subprocess) keeps the previous checkpoint and names the directory and the bytes needed."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from verlcli.errors import UserError
from verlcli.manifest import check_manifest, read_manifest
from verlcli.trainer import run_dir as rd

REPO = Path(__file__).resolve().parents[2]


def _cfg(run, resume="auto"):
    return SimpleNamespace(run_dir=str(run), trainer=SimpleNamespace(resume=resume))


def _writer(step, size=1000):
    def write(d: Path):
        (d / "actor").mkdir()
        (d / "actor" / "weights.bin").write_bytes(os.urandom(size))
        (d / "trainer.json").write_text(json.dumps({"step": step}))
    return write


def _run(tmp_path):
    run = rd.prepare(_cfg(tmp_path / "run"), lambda c: "x: 1\n")
    return run


def test_save_writes_manifest_last_renames_and_keeps_k(tmp_path):
    run = _run(tmp_path)
    for step in (1, 2, 3):
        rd.save_step(run, step, _writer(step), keep=2)
    assert [s for s, _ in rd.checkpoints(run)] == [2, 3]
    assert not list((run / "checkpoints").glob("*.tmp"))
    m = read_manifest(run / "checkpoints" / "step_3")
    assert set(m["files"]) == {"actor/weights.bin", "trainer.json"} and m["step"] == 3
    assert m["total_bytes"] == 1000 + len(json.dumps({"step": 3}))
    assert check_manifest(run / "checkpoints" / "step_3", hashes=True) == []
    assert rd.resume_from(_cfg(run), run).name == "step_3"
    (run / "checkpoints" / "step_3" / "huggingface").mkdir()  # merge-checkpoint's default output
    (run / "checkpoints" / "step_3" / "huggingface" / "config.json").write_text("{}")
    assert rd.resume_from(_cfg(run), run).name == "step_3"


def test_half_written_or_damaged_checkpoints_are_never_resumed(tmp_path, capsys):
    run = _run(tmp_path)
    rd.save_step(run, 2, _writer(2), keep=5)
    rd.save_step(run, 3, _writer(3), keep=5)
    # A save killed half-way: only a .tmp (and a step dir without manifest, as an old
    # trainer.json-marked layout would leave) — neither counts.
    (run / "checkpoints" / "step_5.tmp" / "actor").mkdir(parents=True)
    (run / "checkpoints" / "step_4").mkdir()
    (run / "checkpoints" / "step_4" / "trainer.json").write_text("{}")
    # The newest published one was damaged afterwards (truncated file).
    weights = run / "checkpoints" / "step_3" / "actor" / "weights.bin"
    weights.write_bytes(weights.read_bytes()[:10])
    assert rd.resume_from(_cfg(run), run).name == "step_2"
    assert "not resuming from" in capsys.readouterr().out
    # The next start deletes the interrupted save.
    rd.prepare(_cfg(run), lambda c: "x: 1\n")
    assert not (run / "checkpoints" / "step_5.tmp").exists()
    # An explicit path that doesn't match its manifest is refused, naming the file.
    with pytest.raises(UserError, match="weights.bin has 10 bytes"):
        rd.resume_from(_cfg(run, str(run / "checkpoints" / "step_3")), run)


def test_failed_save_leaves_previous_checkpoint_and_no_partial_one(tmp_path):
    run = _run(tmp_path)
    rd.save_step(run, 1, _writer(1), keep=1)

    def broken(d):
        (d / "actor").mkdir()
        raise RuntimeError("worker died mid-save")

    with pytest.raises(RuntimeError):
        rd.save_step(run, 2, broken, keep=1)
    assert [s for s, _ in rd.checkpoints(run)] == [1]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_1"]


def test_resave_of_an_existing_step_replaces_it_atomically(tmp_path):
    run = _run(tmp_path)
    rd.save_step(run, 1, _writer(1, 10), keep=2)
    rd.save_step(run, 1, _writer(1, 20), keep=2)
    assert read_manifest(run / "checkpoints" / "step_1")["files"]["actor/weights.bin"]["bytes"] == 20
    # Killed between the two renames: step_1.old is complete and comes back on the next start.
    os.replace(run / "checkpoints" / "step_1", run / "checkpoints" / "step_1.old")
    rd.prepare(_cfg(run), lambda c: "x: 1\n")
    assert rd.resume_from(_cfg(run), run).name == "step_1"


def test_full_disk_keeps_previous_checkpoint_and_says_bytes_needed(tmp_path):
    """RLIMIT_FSIZE stands in for a full disk: writes past it fail with EFBIG."""
    run = _run(tmp_path)
    rd.save_step(run, 1, _writer(1, 200_000), keep=1)
    script = textwrap.dedent(f"""
        import resource, sys
        from pathlib import Path
        from verlcli.trainer import run_dir as rd
        from verlcli.errors import UserError
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_run_dir import _writer
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        try:
            rd.save_step(Path({str(run)!r}), 2, _writer(2, 200_000), keep=1)
        except UserError as e:
            print(e); sys.exit(2)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "out of disk space (file too large)" in r.stdout
    assert str(run / "checkpoints" / "step_2") in r.stdout
    need = read_manifest(run / "checkpoints" / "step_1")["total_bytes"]
    assert f"{need} bytes" in r.stdout  # step_1's size: what a checkpoint of this run needs
    assert "step_1 is intact" in r.stdout and "fix:" in r.stdout
    assert [s for s, _ in rd.checkpoints(run)] == [1]
    assert check_manifest(run / "checkpoints" / "step_1", hashes=True) == []
    assert not (run / "checkpoints" / "step_2.tmp").exists()


def test_truncate_metrics_drops_steps_after_the_checkpoint(tmp_path):
    run = _run(tmp_path)
    rows = [{"step": s, "score/mean": s} for s in (0, 1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "sc')
    rd.truncate_metrics(run, 2)
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_merge_checkpoint_refuses_a_checkpoint_that_does_not_match_its_manifest(tmp_path):
    run = _run(tmp_path)

    def write(d):
        role = d / "actor"
        (role / "model").mkdir(parents=True)
        (role / "hf").mkdir()
        (role / "meta.json").write_text('{"kind": "causal_lm"}')
        (role / "hf" / "config.json").write_text("{}")
        (role / "model" / "__0_0.distcp").write_bytes(b"w" * 100)
        (d / "trainer.json").write_text("{}")

    step = rd.save_step(run, 1, write, keep=1)
    (step / "actor" / "model" / "__0_0.distcp").write_bytes(b"x" * 100)  # same size, other bytes
    out = tmp_path / "hf_out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "verlcli.cli", "merge-checkpoint", str(step), "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    text = " ".join((r.stdout + r.stderr).split())
    assert "does not match" in text and "actor/model/__0_0.distcp has a different sha256" in text
    assert not out.exists()


def test_disk_full_is_found_even_when_the_writer_hides_the_errno(tmp_path):
    """torch's zip writer turns EFBIG into 'unexpected pos': the save probes the disk itself."""
    run = _run(tmp_path)
    rd.save_step(run, 1, _writer(1, 300_000), keep=1)
    script = textwrap.dedent(f"""
        import resource, sys
        from pathlib import Path
        from verlcli.trainer import run_dir as rd
        from verlcli.errors import UserError
        def write(d):
            try:
                (d / "w.bin").write_bytes(b"x" * 300_000)
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        try:
            rd.save_step(Path({str(run)!r}), 2, write, keep=1)
        except UserError as e:
            print(e); sys.exit(2)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "out of disk space (file too large)" in r.stdout and "step_1 is intact" in r.stdout
    assert not list((run / "checkpoints").glob(".verl-disk-probe-*"))
