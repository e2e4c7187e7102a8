"""``python -m bench gpucheck``: the prepared GPU check, one command, everything under one folder.

On a CUDA machine (``--device cuda``, the default) it runs, each step in a subprocess under what is left
of a wall-time budget (``--budget``, default 480 s):

1. ``env.txt``: ``nvidia-smi``, Python, torch, CUDA and cuDNN versions, the device's name;
2. ``pytest.txt``: the device-sensitive tests with the device set to it (``BENCH_TEST_DEVICE``): the
   generated method x basis x model tests, every source's export/reload round trip, every method on
   imported models;
3. ``perf.csv``: ``python -m bench perf --device D --fused`` (train step and inference against the MLP and
   CNN, fused features on and off, compressed forms);
4. ``quick_runs.csv``: the ``quick`` sweep on the device;
5. ``conv_runs.csv``: as much of the ``conv`` sweep at a longer budget (``--conv-epochs``, one seed, the
   codebook methods at MetaCluster's K = 256 among them) as the budget leaves, Fashion-MNIST's IDX
   files read from ``--data-dir`` (carry ``data/`` to the machine); rows are kept as each run ends;
6. ``summary.md``: each step's status and wall time, the pytest summary line, the numbers that matter.

``--device cpu --smoke`` runs every step small (a minute or two on 2 cores): the check is tested here
before any GPU time is spent. The sweeps' own folders go to ``--work`` (default: a temporary folder), so
``--out`` holds at most seven files.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.errors import UserError

DEVICE_TESTS = ["tests/test_methods.py", "tests/test_registries.py::test_source_round_trips_and_file_is_counted_bits",
                "tests/test_interop_methods.py"]
SMOKE_FILTER = "(bspline and kan and not convkan) or source_round_trips or (fastkan and quantize)"


def _versions(device: str) -> str:
    import torch

    lines = [f"python {platform.python_version()} on {platform.machine()} {platform.platform()}",
             f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
             f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}",
             f"device asked: {device}; CUDA available: {torch.cuda.is_available()}"]
    if torch.cuda.is_available():
        lines.append(f"GPU: {torch.cuda.get_device_name(0)}, "
                     f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB")
    smi = shutil.which("nvidia-smi")
    if smi:
        lines += ["", subprocess.run([smi], capture_output=True, text=True).stdout]
    return "\n".join(lines) + "\n"


class Steps:
    """Runs each step in a subprocess under the budget left, logging to ``gpucheck.log``."""

    def __init__(self, out: Path, budget: float, env: dict):
        self.out, self.deadline, self.env = out, time.monotonic() + budget, env
        self.status: list[dict] = []
        self.log = open(out / "gpucheck.log", "a")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, cmd: list[str], reserve: float = 0.0,
            env: dict | None = None) -> subprocess.CompletedProcess | None:
        limit = self.left() - reserve
        if limit < 10:
            self.status.append({"step": name, "status": "skipped (budget spent)", "seconds": 0.0})
            return None
        t0 = time.monotonic()
        self.log.write(f"\n$ {' '.join(cmd)}   (limit {limit:.0f} s)\n")
        self.log.flush()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env={**self.env, **(env or {})})
            status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
        except subprocess.TimeoutExpired as exc:
            proc = subprocess.CompletedProcess(cmd, 124, exc.stdout or "", exc.stderr or "")
            proc.stdout = proc.stdout.decode() if isinstance(proc.stdout, bytes) else proc.stdout
            proc.stderr = proc.stderr.decode() if isinstance(proc.stderr, bytes) else proc.stderr
            status = "timed out (partial results kept)"
        self.log.write((proc.stdout or "")[-20000:] + (proc.stderr or "")[-20000:])
        self.log.flush()
        self.status.append({"step": name, "status": status, "seconds": round(time.monotonic() - t0, 1)})
        return proc


def _copy_runs(folder: Path, dest: Path) -> int:
    """The rows finished so far (``runs.csv``, or the row files of a cut-short sweep) into ``dest``."""
    import pandas as pd

    if (folder / "runs.csv").is_file():
        shutil.copy(folder / "runs.csv", dest)
        return len(pd.read_csv(dest))
    rows = [json.loads(p.read_text()) for p in sorted((folder / "rows").glob("*.json"))] if (folder / "rows").is_dir() \
        else []
    if rows:
        pd.DataFrame(rows).to_csv(dest, index=False)
    return len(rows)


def main(args) -> int:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} is not empty; give a new folder")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("gpucheck --device cuda needs a CUDA GPU; on this machine run --device cpu --smoke")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpucheck-"))
    py, dev, smoke = sys.executable, args.device, args.smoke
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "BENCH_TEST_DEVICE": dev}
    steps = Steps(out, args.budget, env)
    (out / "env.txt").write_text(_versions(dev))

    pytest_cmd = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *DEVICE_TESTS]
    if smoke:
        pytest_cmd += ["-k", SMOKE_FILTER]
    proc = steps.run("device tests", pytest_cmd, reserve=0.55 * steps.left())
    summary_line = ""
    if proc is not None:
        text = (proc.stdout or "") + (proc.stderr or "")
        (out / "pytest.txt").write_text(text[-60000:])
        summary_line = next((ln for ln in reversed(text.splitlines()) if " passed" in ln or " failed" in ln), "")

    perf = [py, "-m", "bench", "perf", "--device", dev, "--out", str(out / "perf.csv"), "--fused"]
    if smoke:
        perf += ["--bases", "bspline", "--repeats", "3", "--conv-channels", "4,8", "--conv-batch", "8", "--batch", "64"]
    steps.run("perf", perf, reserve=0.5 * steps.left())

    quick = [py, "-m", "bench", "run", "--sweep", "quick", "--device", dev, "--out", str(work / "quick"), "--quiet",
             "--no-report", "--data-dir", args.data_dir]
    if smoke:
        quick += ["--datasets", "digits", "--methods", "dense,dense_ft,quantize,kmeans", "--epochs", "2"]
    steps.run("quick sweep", quick, reserve=0.4 * steps.left())
    n_quick = _copy_runs(work / "quick", out / "quick_runs.csv")

    conv = [py, "-m", "bench", "run", "--sweep", "conv", "--device", dev, "--out", str(work / "conv"), "--quiet",
            "--no-report", "--data-dir", args.data_dir, "--seeds", "0", "--epochs", str(args.conv_epochs),
            "--methods", "dense,dense_ft,metacluster(K=256),kmeans(K=256),quantize(bits=4)"]
    if smoke:
        conv += ["--datasets", "digits", "--bases", "bspline", "--epochs", "1", "--finetune-epochs", "1",
                 "--methods", "dense,dense_ft,kmeans(K=16)"]
    steps.run("conv sweep (longer budget)", conv, reserve=5)
    n_conv = _copy_runs(work / "conv", out / "conv_runs.csv")

    lines = [f"# GPU check ({'smoke, ' if smoke else ''}device {dev})", "",
             f"- command: `python -m bench gpucheck {' '.join(sys.argv[2:])}`",
             f"- {(out / 'env.txt').read_text().splitlines()[1]}", f"- tests: {summary_line or 'no summary line'}",
             f"- quick sweep rows: {n_quick}; conv sweep rows: {n_conv} "
             f"(conv epochs {1 if smoke else args.conv_epochs})", "",
             "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} |" for s in steps.status]
    if (out / "perf.csv").is_file():
        import pandas as pd

        df = pd.read_csv(out / "perf.csv")
        lines += ["", "## perf (ratio = value / reference)", "", "| kind | basis | subject | ratio |",
                  "|---|---|---|---|"]
        lines += [f"| {r.kind} | {r.basis} | {r.subject} | {r.ratio:.2f} |" for r in df.itertuples()]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    steps.log.close()
    print("\n".join(lines[: lines.index("## perf (ratio = value / reference)") - 1] if "## perf (ratio = value / "
                     "reference)" in lines else lines))
    print(f"wrote {out}/ (env.txt, pytest.txt, perf.csv, quick_runs.csv, conv_runs.csv, summary.md, gpucheck.log)")
    bad = [s for s in steps.status if s["status"] not in ("ok",)]
    return 1 if bad else 0
