"""``python -m bench gpucheck``: the prepared GPU check, one command, everything under one folder.

On a CUDA machine (``--device cuda``, the default) it runs, within a wall-time budget (``--budget``,
default 480 s), each step in its own process:

1. ``env.txt``: ``nvidia-smi``, Python, torch, CUDA and cuDNN versions, the device's name;
2. ``perf.csv``: ``python -m bench perf --device D --fused --anchors`` (train step and inference against the
   MLP and CNN, compiled features against eager, compressed forms, flashkan and inkan where installed),
   first and alone: its timings need an otherwise idle machine (at most a third of the budget);
3. then at once, sharing the device (a KAN this small leaves a GPU mostly idle, so running side by side
   gets more of the budget; their own rows' seconds are therefore not timings):

   - ``pytest.txt``: the device-sensitive tests with the device set to it (``BENCH_TEST_DEVICE``): the
     generated method x basis x model tests, every source's export/reload round trip, every method on
     imported models (on pytest-xdist workers where it is installed and the machine has the cores);
   - ``quick_runs.csv``: the ``quick`` sweep on the device;
   - ``conv_runs.csv``: the ``conv`` sweep at a longer budget (``--conv-epochs``, ``--conv-finetune-epochs``,
     one seed, the codebook methods at MetaCluster's K = 256 among the methods), one process per basis,
     Fashion-MNIST's IDX files read from ``--data-dir``;

   at the deadline each is stopped as Ctrl-C would stop it, so every finished row and each sweep's log line
   (``invocations.jsonl``, outcome ``interrupted``) are kept;
4. ``invocations.jsonl``: the sweep calls' log lines (what ``bench report`` prints in a leaderboard's
   header); ``summary.md``: each step's status and wall time, the pytest summary line, the perf ratios;
   ``gpucheck.log``: every step's output.

``--device cpu --smoke`` runs every step small (a minute or two on 2 cores): the check is tested here
before any GPU time is spent. The sweeps' own folders go to ``--work`` (default: a temporary folder), so
``--out`` holds at most eight files (what a remote machine hands back).
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.errors import UserError

DEVICE_TESTS = ["tests/test_methods.py", "tests/test_registries.py::test_source_round_trips_and_file_is_counted_bits",
                "tests/test_interop_methods.py"]
SMOKE_FILTER = "(bspline and kan and not convkan) or source_round_trips or (fastkan and quantize)"
CONV_METHODS = "dense,dense_ft,metacluster(K=256),kmeans(K=256),quantize(bits=4)"
CONV_BASES = ("bspline", "rbf", "gram")
FILES = ("env.txt", "perf.csv", "pytest.txt", "quick_runs.csv", "conv_runs.csv", "invocations.jsonl", "summary.md",
         "gpucheck.log")
GRACE = 20.0  # seconds a stopped step has to write its log line before it is killed


def _versions(device: str) -> str:
    import torch

    lines = [f"python {platform.python_version()} on {platform.machine()} {platform.platform()}",
             f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
             f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}",
             f"device asked: {device}; CUDA available: {torch.cuda.is_available()}; CPUs: {os.cpu_count()}"]
    if torch.cuda.is_available():
        lines.append(f"GPU: {torch.cuda.get_device_name(0)}, "
                     f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB")
    smi = shutil.which("nvidia-smi")
    if smi:
        lines += ["", subprocess.run([smi], capture_output=True, text=True).stdout]
    return "\n".join(lines) + "\n"


class Steps:
    """Starts each step as a process, stops what is still running at the deadline, logs to ``gpucheck.log``."""

    def __init__(self, out: Path, work: Path, budget: float, env: dict):
        self.out, self.work, self.env = out, work, env
        self.deadline = time.monotonic() + budget
        self.status: list[dict] = []
        self.running: list[tuple[str, subprocess.Popen, Path, float]] = []

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def start(self, name: str, cmd: list[str]) -> None:
        if self.left() < GRACE + 10:
            self.status.append({"step": name, "status": "skipped (budget spent)", "seconds": 0.0})
            return
        log = self.work / f"{name.replace(' ', '_')}.log"
        with open(log, "w") as fh:
            fh.write(f"$ {' '.join(cmd)}\n")
            fh.flush()
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=self.env)
        self.running.append((name, proc, log, time.monotonic()))

    def wait(self, until: float | None = None) -> dict[str, str]:
        """Waits for every running step, stopping (SIGINT, then a kill after ``GRACE`` s) whatever is still
        running at ``until`` (default: the deadline less the grace); returns each step's output."""
        until = self.deadline - GRACE if until is None else until
        outputs = {}
        for name, proc, log, t0 in self.running:
            status = None
            try:
                proc.wait(timeout=max(0.0, until - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)  # as Ctrl-C: a sweep keeps its rows and writes its log line
                status = "stopped at the budget (partial results kept)"
                try:
                    proc.wait(timeout=GRACE)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            status = status or ("ok" if proc.returncode == 0 else f"exit {proc.returncode}")
            self.status.append({"step": name, "status": status, "seconds": round(time.monotonic() - t0, 1)})
            outputs[name] = log.read_text(errors="replace")
        self.running = []
        with open(self.out / "gpucheck.log", "a") as fh:
            for text in outputs.values():
                fh.write(f"\n{text[-20000:]}\n")
        return outputs


def _copy_runs(folders: list[Path], dest: Path) -> int:
    """The rows finished so far in ``folders`` (``runs.csv``, or the row files of a stopped sweep) into one
    CSV at ``dest``."""
    import pandas as pd

    frames = []
    for folder in folders:
        if (folder / "runs.csv").is_file():
            frames.append(pd.read_csv(folder / "runs.csv"))
        elif (folder / "rows").is_dir():
            rows = [json.loads(p.read_text()) for p in sorted((folder / "rows").glob("*.json"))]
            frames += [pd.DataFrame(rows)] if rows else []
    if frames:
        pd.concat(frames, ignore_index=True).to_csv(dest, index=False)
    return sum(len(f) for f in frames)


def _test_workers() -> list[str]:
    """``-n N`` where pytest-xdist is installed and the machine has cores to spare (none on 2 cores)."""
    cpus = os.cpu_count() or 1
    return ["-n", str(min(8, cpus // 4))] if cpus >= 8 and importlib.util.find_spec("xdist") else []


def main(args) -> int:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} is not empty; give a new folder")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("gpucheck --device cuda needs a CUDA GPU; on this machine run --device cpu --smoke")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpucheck-"))
    work.mkdir(parents=True, exist_ok=True)
    py, dev, smoke = sys.executable, args.device, args.smoke
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "BENCH_TEST_DEVICE": dev}
    steps = Steps(out, work, args.budget, env)
    (out / "env.txt").write_text(_versions(dev))

    # 1. perf, alone
    perf = [py, "-m", "bench", "perf", "--device", dev, "--out", str(out / "perf.csv"), "--fused", "--anchors"]
    if smoke:
        perf += ["--bases", "bspline", "--repeats", "3", "--conv-channels", "4,8", "--conv-batch", "8", "--batch", "64"]
    steps.start("perf", perf)
    steps.wait(until=time.monotonic() + args.budget / 3)

    # 2. tests and sweeps side by side
    tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *_test_workers(), *DEVICE_TESTS]
    if smoke:
        tests += ["-k", SMOKE_FILTER]
    steps.start("device tests", tests)
    sweep = [py, "-m", "bench", "run", "--device", dev, "--quiet", "--no-report", "--data-dir", args.data_dir]
    quick = [*sweep, "--sweep", "quick", "--out", str(work / "quick")]
    if smoke:
        quick += ["--datasets", "digits", "--methods", "dense,dense_ft,quantize,kmeans", "--epochs", "2"]
    steps.start("quick sweep", quick)
    conv_dirs = []
    for basis in CONV_BASES[:1] if smoke else CONV_BASES:
        conv_dirs.append(work / f"conv_{basis}")
        conv = [*sweep, "--sweep", "conv", "--out", str(conv_dirs[-1]), "--seeds", "0", "--bases", basis,
                "--epochs", str(args.conv_epochs), "--finetune-epochs", str(args.conv_finetune_epochs),
                "--methods", CONV_METHODS]
        if smoke:
            conv += ["--datasets", "digits", "--epochs", "1", "--finetune-epochs", "1",
                     "--methods", "dense,dense_ft,kmeans(K=16)"]
        steps.start(f"conv sweep {basis}", conv)
    outputs = steps.wait()

    text = outputs.get("device tests", "")
    (out / "pytest.txt").write_text(text[-60000:])
    summary_line = next((ln for ln in reversed(text.splitlines()) if " passed" in ln or " failed" in ln), "")
    n_quick = _copy_runs([work / "quick"], out / "quick_runs.csv")
    n_conv = _copy_runs(conv_dirs, out / "conv_runs.csv")
    calls = [line for folder in [work / "quick", *conv_dirs] if (folder / "invocations.jsonl").is_file()
             for line in (folder / "invocations.jsonl").read_text().splitlines() if line.strip()]
    (out / "invocations.jsonl").write_text("".join(f"{line}\n" for line in calls))

    lines = [f"# GPU check ({'smoke, ' if smoke else ''}device {dev})", "",
             f"- command: `python -m bench gpucheck {' '.join(sys.argv[2:])}`",
             f"- {(out / 'env.txt').read_text().splitlines()[1]}", f"- tests: {summary_line or 'no summary line'}",
             f"- quick sweep rows: {n_quick}; conv sweep rows: {n_conv} (conv epochs "
             f"{1 if smoke else args.conv_epochs}, fine-tune {1 if smoke else args.conv_finetune_epochs}; tests "
             "and sweeps ran side by side after perf, so their rows' seconds are not timings)", "",
             "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} |" for s in steps.status]
    head = len(lines)
    if (out / "perf.csv").is_file():
        import pandas as pd

        df = pd.read_csv(out / "perf.csv")
        lines += ["", "## perf (ratio = value / reference)", "", "| kind | basis | subject | ratio |",
                  "|---|---|---|---|"]
        lines += [f"| {r.kind} | {r.basis} | {r.subject} | {r.ratio:.2f} |" for r in df.itertuples()]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:head]))
    print(f"wrote {out}/ ({', '.join(name for name in FILES if (out / name).is_file())})")
    return 1 if any(s["status"] != "ok" for s in steps.status) else 0
