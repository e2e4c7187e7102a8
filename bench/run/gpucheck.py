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
   - ``conv_runs.csv``: the ``conv`` sweep at a longer budget (``--conv-epochs``, ``--conv-finetune-epochs``
     and a patience to match, ``--conv-patience``: the sweep's 2, set for 5 epochs, stopped a 15-epoch gram
     base after 3 on a noisy validation epoch; one seed, the codebook methods at MetaCluster's K = 256
     among the methods), one process per basis, Fashion-MNIST's IDX files read from ``--data-dir``;

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
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
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
    """Starts each step as a process in its own session, stops what is still running at a deadline (all of
    them at once, as Ctrl-C stops a terminal's programs), logs to ``gpucheck.log``."""

    def __init__(self, out: Path, work: Path, budget: float, env: dict):
        self.out, self.work, self.env = out, work, env
        self.deadline = time.monotonic() + budget
        self.status: list[dict] = []
        self.running: list[dict] = []

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def start(self, name: str, cmd: list[str], keeps_partial: bool = True) -> None:
        """``keeps_partial``: whether the step keeps what it finished when stopped (a sweep keeps its rows;
        ``bench perf`` writes its table only at the end)."""
        if self.left() < GRACE + 10:
            self.status.append({"step": name, "status": "skipped (budget spent)", "seconds": 0.0})
            return
        log = self.work / f"{name.replace(' ', '_')}.log"
        with open(log, "w") as fh:
            fh.write(f"$ {' '.join(cmd)}\n")
            fh.flush()
            # its own session (a process group with the step's children: pytest-xdist and compile workers), and
            # Ctrl-C restored in case this check was started with SIGINT ignored (a background job)
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
                                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        step = {"name": name, "proc": proc, "log": log, "t0": time.monotonic(), "end": None, "stopped": False,
                "keeps_partial": keeps_partial}
        self.running.append(step)

        def note_exit():  # the step's own run time, whenever the check looks next
            proc.wait()
            step["end"] = time.monotonic()

        threading.Thread(target=note_exit, daemon=True).start()

    def _poll(self) -> bool:
        """True while any step still runs."""
        return any(step["end"] is None for step in self.running)

    def _signal(self, sig: int) -> None:
        for step in self.running:
            if step["end"] is None:
                step["stopped"] = True
                try:
                    os.killpg(step["proc"].pid, sig)
                except ProcessLookupError:
                    pass

    def wait(self, until: float | None = None) -> dict[str, str]:
        """Waits for every running step; at ``until`` (default: the deadline less the grace) sends SIGINT to
        every step still running, and after ``GRACE`` s kills what is left. Returns each step's output."""
        until = self.deadline - GRACE if until is None else until
        while self._poll() and time.monotonic() < until:
            time.sleep(0.2)
        if self._poll():
            self._signal(signal.SIGINT)  # as Ctrl-C: a sweep keeps its rows and writes its log line
            grace_end = time.monotonic() + GRACE
            while self._poll() and time.monotonic() < grace_end:
                time.sleep(0.2)
            self.stop_all()
        outputs = {}
        for step in self.running:
            if step["stopped"]:
                status = "stopped at the budget" + (" (partial results kept)" if step["keeps_partial"]
                                                    else " (nothing kept)")
            else:
                status = "ok" if step["proc"].returncode == 0 else f"exit {step['proc'].returncode}"
            self.status.append({"step": step["name"], "status": status,
                                "seconds": round(step["end"] - step["t0"], 1)})
            outputs[step["name"]] = step["log"].read_text(errors="replace")
        self.running = []
        with open(self.out / "gpucheck.log", "a") as fh:
            for text in outputs.values():
                fh.write(f"\n{text[-20000:]}\n")
        return outputs

    def stop_all(self) -> None:
        """Kills every step still running and waits for them (after the grace; or an error or Ctrl-C in the
        check itself)."""
        self._signal(signal.SIGKILL)
        while self._poll():
            time.sleep(0.05)


def conv_patience(args) -> int:
    """The conv sweep's early-stopping patience at ``--conv-epochs``: ``--conv-patience``, else a third of the
    epochs (the sweep's own 2 is for its 5), at least 2."""
    if args.conv_patience is not None:
        return args.conv_patience
    return max(2, args.conv_epochs // 3)


def _copy_runs(folders: list[Path], dest: Path) -> int:
    """The rows finished so far in ``folders`` (:func:`bench.run.results.read_results`: a sweep's table, or
    the row files of a stopped one) into one CSV at ``dest``."""
    import pandas as pd

    from bench.run.results import read_results

    frames = []
    for folder in folders:
        try:
            frames.append(read_results(folder, warn=lambda _: None))  # a stopped sweep's rows: no table, expected
        except UserError:
            pass  # no run of that sweep finished
    frames = [f for f in frames if len(f)]
    if frames:
        pd.concat(frames, ignore_index=True).to_csv(dest, index=False)
    return sum(len(f) for f in frames)


def _test_workers() -> list[str]:
    """``-n N`` where pytest-xdist is installed and the machine has cores to spare (none on 2 cores)."""
    cpus = os.cpu_count() or 1
    return ["-n", str(min(8, cpus // 4))] if cpus >= 8 and importlib.util.find_spec("xdist") else []


def _run_steps(steps: Steps, args, py: str, work: Path) -> tuple[dict[str, str], list[Path]]:
    """perf alone, then the tests and the sweeps side by side; returns each step's output and the conv
    sweeps' folders."""
    dev, smoke = args.device, args.smoke
    perf = [py, "-m", "bench", "perf", "--device", dev, "--out", str(Path(args.out) / "perf.csv"), "--fused",
            "--anchors"]
    if smoke:
        perf += ["--bases", "bspline", "--repeats", "3", "--conv-channels", "4,8", "--conv-batch", "8", "--batch", "64"]
    steps.start("perf", perf, keeps_partial=False)  # it writes its table at the end
    steps.wait(until=time.monotonic() + args.budget / 3)

    tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *_test_workers(), *DEVICE_TESTS]
    steps.start("device tests", tests + (["-k", SMOKE_FILTER] if smoke else []))
    sweep = [py, "-m", "bench", "run", "--device", dev, "--quiet", "--no-report", "--data-dir", args.data_dir]
    quick = ["--datasets", "digits", "--methods", "dense,dense_ft,quantize,kmeans", "--epochs", "2"] if smoke else []
    steps.start("quick sweep", [*sweep, "--sweep", "quick", "--out", str(work / "quick"), *quick])
    if smoke:
        budget = ["--datasets", "digits", "--epochs", "1", "--finetune-epochs", "1", "--methods",
                  "dense,dense_ft,kmeans(K=16)"]
    else:
        budget = ["--epochs", str(args.conv_epochs), "--finetune-epochs", str(args.conv_finetune_epochs),
                  "--patience", str(conv_patience(args)),
                  "--methods", CONV_METHODS]
    conv_dirs = []
    for basis in CONV_BASES[:1] if smoke else CONV_BASES:
        conv_dirs.append(work / f"conv_{basis}")
        steps.start(f"conv sweep {basis}", [*sweep, "--sweep", "conv", "--out", str(conv_dirs[-1]), "--seeds", "0",
                                            "--bases", basis, *budget])
    return steps.wait(), conv_dirs


def main(args) -> int:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} is not empty; give a new folder")
    for flag, value, least in (("--conv-epochs", args.conv_epochs, 1), ("--conv-finetune-epochs",
                               args.conv_finetune_epochs, 0), ("--conv-patience", args.conv_patience, 0)):
        if value is not None and value < least:  # else refused only in the sweeps, after perf's share of the budget
            raise UserError(f"gpucheck {flag} must be at least {least}, got {value}")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("gpucheck --device cuda needs a CUDA GPU; on this machine run --device cpu --smoke")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpucheck-"))
    if work.exists() and any(work.iterdir()):  # a sweep there would resume its old rows and count them as new
        raise UserError(f"--work {work} is not empty; give a new folder")
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    dev, smoke = args.device, args.smoke
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "BENCH_TEST_DEVICE": dev}
    steps = Steps(out, work, args.budget, env)
    (out / "env.txt").write_text(_versions(dev))
    try:
        outputs, conv_dirs = _run_steps(steps, args, sys.executable, work)
    finally:
        steps.stop_all()

    text = outputs.get("device tests", "")
    (out / "pytest.txt").write_text(text[-60000:])
    summary_line = next((ln for ln in reversed(text.splitlines()) if " passed" in ln or " failed" in ln), "")
    n_quick = _copy_runs([work / "quick"], out / "quick_runs.csv")
    n_conv = _copy_runs(conv_dirs, out / "conv_runs.csv")
    calls = [line for folder in [work / "quick", *conv_dirs] if (folder / "invocations.jsonl").is_file()
             for line in (folder / "invocations.jsonl").read_text().splitlines() if line.strip()]
    (out / "invocations.jsonl").write_text("".join(f"{line}\n" for line in calls))

    conv_budget = ("epochs 1, fine-tune 1, the sweep's patience" if smoke else
                   f"epochs {args.conv_epochs}, fine-tune {args.conv_finetune_epochs}, patience {conv_patience(args)}")
    lines = [f"# GPU check ({'smoke, ' if smoke else ''}device {dev})", "",
             f"- command: `{getattr(args, 'command_line', None) or 'python -m bench gpucheck'}`",
             f"- {(out / 'env.txt').read_text().splitlines()[1]}", f"- tests: {summary_line or 'no summary line'}",
             f"- quick sweep rows: {n_quick}; conv sweep rows: {n_conv} (conv {conv_budget}; tests "
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
