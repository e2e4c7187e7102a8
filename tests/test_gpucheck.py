"""The prepared GPU check (``python -m bench gpucheck``), tested here in its CPU smoke mode before any
GPU time is spent on it."""

import json

import pandas as pd
import pytest
import torch

from bench.cli import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the real check")
def test_cuda_check_without_a_gpu_is_one_line(tmp_path, capsys):
    assert main(["gpucheck", "--out", str(tmp_path / "g"), "--device", "cuda"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err and not (tmp_path / "g").exists()


def test_smoke_check_writes_every_file_and_each_step_ran(tmp_path, capsys):
    out = tmp_path / "gpu"
    code = main(["gpucheck", "--out", str(out), "--device", "cpu", "--smoke", "--budget", "240",
                 "--work", str(tmp_path / "work")])
    names = sorted(p.name for p in out.iterdir())
    assert names == ["conv_runs.csv", "env.txt", "gpucheck.log", "invocations.jsonl", "perf.csv", "pytest.txt",
                     "quick_runs.csv", "summary.md"], names
    summary = (out / "summary.md").read_text()
    for step in ("device tests", "perf", "quick sweep", "conv sweep bspline"):
        assert f"| {step}" in summary
    assert code == 0, summary
    assert " passed" in (out / "pytest.txt").read_text()
    for csv in ("quick_runs.csv", "conv_runs.csv"):
        rows = pd.read_csv(out / csv)
        assert len(rows) >= 3 and (rows.status == "ok").all() and (rows.device == "cpu").all()
    calls = [json.loads(line) for line in (out / "invocations.jsonl").read_text().splitlines()]
    assert main(["gpucheck", "--out", str(tmp_path / "again"), "--device", "cpu", "--smoke", "--work",
                 str(tmp_path / "work")]) == 2  # a used --work would resume its old rows
    assert len(calls) == 2 and all(c["outcome"] == "finished" for c in calls), calls  # quick, conv per basis
    assert main(["gpucheck", "--out", str(out), "--device", "cpu", "--smoke"]) == 2  # never over a finished check


def test_steps_still_running_at_the_deadline_are_stopped_together_as_ctrl_c_would_and_keep_what_they_wrote(
        tmp_path):
    """A sweep stopped at the budget must write its log line and keep its rows: every step still running gets
    SIGINT at the same moment (a KeyboardInterrupt it can handle, not a kill), even if this process ignores
    SIGINT; a step's seconds are its own run time."""
    import signal
    import sys
    import time

    from bench.run.gpucheck import GRACE, Steps

    def script(name):
        return ("import time, pathlib\n"
                f"pathlib.Path({str(tmp_path / name)!r} + '.ready').write_text('')\n"
                "try:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
                f"    pathlib.Path({str(tmp_path / name)!r}).write_text('interrupted')\n    raise SystemExit(130)\n")

    old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a background job: the steps must not inherit it
    try:
        steps = Steps(tmp_path, tmp_path, budget=120.0, env={})
        steps.start("quick step", [sys.executable, "-c", "pass"])
        for name in ("slow a", "slow b"):
            steps.start(name, [sys.executable, "-c", script(name)])
    finally:
        signal.signal(signal.SIGINT, old)
    while not all((tmp_path / f"slow {x}.ready").exists() for x in "ab"):
        time.sleep(0.05)
    time.sleep(1.0)
    t0 = time.monotonic()
    steps.wait(until=time.monotonic())
    assert time.monotonic() - t0 < GRACE  # both stopped at once, neither waited for a kill
    assert [(tmp_path / f"slow {x}").read_text() for x in "ab"] == ["interrupted", "interrupted"]
    status = {s["step"]: s for s in steps.status}
    assert status["quick step"]["status"] == "ok"
    assert status["quick step"]["seconds"] < 1.0 <= status["slow a"]["seconds"]
    assert status["slow a"]["status"] == status["slow b"]["status"] == "stopped at the budget (partial results kept)"


def test_a_copy_without_git_names_its_commit_from_the_environment_and_a_checkout_keeps_its_own(monkeypatch):
    """The tree travels to a lent GPU machine without .git: BENCH_GIT_SHA names its commit there. Inside a
    real checkout git answers, so a stale variable never mislabels rows."""
    import subprocess

    from bench import provenance

    monkeypatch.setenv("BENCH_GIT_SHA", "abc1234")
    assert provenance.git_sha() not in ("abc1234", "unknown")  # this checkout's own commit

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert provenance.git_sha() == "abc1234"
    monkeypatch.delenv("BENCH_GIT_SHA")
    assert provenance.git_sha() == "unknown"


def test_conv_patience_grows_with_the_longer_budget():
    """The conv sweep's patience of 2 is for its 5 epochs: at the check's 15 it stopped a gram base after 3
    (reports/gpu), so the check passes a third of its epochs unless told otherwise."""
    from bench.cli import build_parser
    from bench.run.gpucheck import conv_patience

    def args(*extra):
        return build_parser().parse_args(["gpucheck", "--out", "x", *extra])

    assert conv_patience(args()) == 5
    assert conv_patience(args("--conv-epochs", "4")) == 2
    assert conv_patience(args("--conv-patience", "0")) == 0


@pytest.mark.parametrize("flag", ["--conv-epochs", "--conv-patience", "--conv-finetune-epochs"])
def test_a_bad_conv_budget_is_refused_before_any_step(tmp_path, capsys, flag):
    assert main(["gpucheck", "--out", str(tmp_path / "g"), "--device", "cpu", "--smoke", flag, "-1"]) == 2
    assert flag in capsys.readouterr().err and not (tmp_path / "g").exists()
