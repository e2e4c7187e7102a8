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
    assert len(calls) == 2 and all(c["outcome"] == "finished" for c in calls), calls  # quick, conv per basis
    assert main(["gpucheck", "--out", str(out), "--device", "cpu", "--smoke"]) == 2  # never over a finished check


def test_a_step_still_running_at_the_deadline_is_stopped_as_ctrl_c_would_and_keeps_what_it_wrote(tmp_path):
    """A sweep stopped at the budget must write its log line and keep its rows: the step gets SIGINT (a
    KeyboardInterrupt it can handle), not a kill."""
    import sys
    import time

    from bench.run.gpucheck import Steps

    done = tmp_path / "handled"
    script = ("import time, pathlib\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
              f"    pathlib.Path({str(done)!r}).write_text('interrupted')\n    raise SystemExit(130)\n")
    steps = Steps(tmp_path, tmp_path, budget=60.0, env={})
    steps.start("slow step", [sys.executable, "-c", script])
    t0 = time.monotonic()
    steps.wait(until=time.monotonic() + 2)
    assert time.monotonic() - t0 < 20
    assert done.read_text() == "interrupted"
    assert steps.status == [{"step": "slow step", "status": "stopped at the budget (partial results kept)",
                             "seconds": steps.status[0]["seconds"]}]
