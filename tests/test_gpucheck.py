"""The prepared GPU check (``python -m bench gpucheck``), tested here in its CPU smoke mode before any
GPU time is spent on it."""

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
    assert names == ["conv_runs.csv", "env.txt", "gpucheck.log", "perf.csv", "pytest.txt", "quick_runs.csv",
                     "summary.md"], names
    summary = (out / "summary.md").read_text()
    for step in ("device tests", "perf", "quick sweep", "conv sweep"):
        assert f"| {step}" in summary
    assert code == 0, summary
    assert " passed" in (out / "pytest.txt").read_text()
    for csv in ("quick_runs.csv", "conv_runs.csv"):
        rows = pd.read_csv(out / csv)
        assert len(rows) >= 3 and (rows.status == "ok").all() and (rows.device == "cpu").all()
    assert main(["gpucheck", "--out", str(out), "--device", "cpu", "--smoke"]) == 2  # never over a finished check
