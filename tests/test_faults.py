"""Fault injection: what is kept, what is redone and what the user is told when things go wrong.

Kills, concurrent writers, damaged row files and tables, bad output folders, broken or clashing
plugins, runs that fail or diverge, and every input mistake that must be caught before any training.
Tiny datasets (tests/plugins/tiny.py) and budgets of 1 epoch keep the whole file well under 2 minutes
on 2 CPU cores; the kill and the concurrent writer use real ``python -m bench`` subprocesses.
"""

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import bench.run.train
from bench.cli import main
from bench.registry import load_plugin_file, load_plugins
from bench.run.lock import HOLDER_NAME, results_writer
from bench.run.results import scan_rows

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = str(Path(__file__).parent / "plugins")
TINY = ["--plugin", PLUGINS, "--datasets", "tiny_images", "--bases", "bspline", "--epochs", "1",
        "--finetune-epochs", "1", "--quiet", "--device", "cpu", "--no-report"]


def bench_cli(*args, timeout=120):
    """``python -m bench ARGS`` in a subprocess from the repository root."""
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def one_line_error(capsys, argv, *fragments):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for f in fragments:
        assert f in err, err
    return err


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if anything starts training (the mistake must be caught before)."""

    def boom(*a, **k):
        raise AssertionError("training started although the input was invalid")

    monkeypatch.setattr(bench.run.train.Trainer, "fit", boom)


def rows_by_id(out: Path) -> dict:
    rows, bad = scan_rows(out / "rows")
    assert not bad, bad
    return {r["run_id"]: r for r in rows}


def done_counts(stdout: str) -> dict:
    m = re.search(r"done in \d+s: (\d+) ok, (\d+) failed, (\d+) diverged, (?:(\d+) infeasible, )?(\d+) already "
                  r"finished", stdout)
    assert m, stdout
    ok, failed, diverged, infeasible, skipped = m.groups()
    return {"ok": int(ok), "failed": int(failed), "diverged": int(diverged), "infeasible": int(infeasible or 0),
            "skipped_finished": int(skipped)}


# ------------------------------------------------------------------------------------------ kills and writers
def test_sigkill_mid_sweep_loses_no_finished_run_and_redoes_only_the_rest(tmp_path):
    out = tmp_path / "res"
    cfg = tmp_path / "slower.toml"  # ~0.4 s per run on 2 cores, so the kill lands inside a run
    cfg.write_text("[dataset.tiny_images]\nn = 12000\n")
    args = ["run", *TINY, "--config", str(cfg), "--epochs", "2", "--methods", "dense", "--seeds", "0,1,2,3,4,5",
            "--out", str(out)]
    rng = random.Random()
    kill_after = rng.randint(1, 4)  # finished rows before the kill
    p = subprocess.Popen([sys.executable, "-m", "bench", *args], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while len(list((out / "rows").glob("*.json"))) < kill_after:
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "the sweep never wrote its rows"
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.3))  # somewhere inside the next run (or its row write)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert p.returncode == -signal.SIGKILL, f"the sweep ended before the kill (after {kill_after} rows)"
    kept = rows_by_id(out)  # every row file on disk is whole: atomic writes
    assert kill_after <= len(kept) < 6
    assert json.loads((out / HOLDER_NAME).read_text())["pid"] == p.pid  # the killed writer left its record

    again = bench_cli(*args)
    assert again.returncode == 0, again.stderr
    # told: the killed writer's lock was taken over; only the unfinished runs were run
    assert f"pid {p.pid}" in again.stderr and "taking it over" in again.stderr
    assert done_counts(again.stdout) == {"ok": 6 - len(kept), "failed": 0, "diverged": 0, "infeasible": 0,
                                         "skipped_finished": len(kept)}
    final = rows_by_id(out)
    assert len(final) == 6 and all(r["status"] == "ok" for r in final.values())
    assert all(final[rid] == row for rid, row in kept.items())  # kept: not one finished row was redone
    assert len(pd.read_parquet(out / "runs.parquet")) == 6
    assert not list((out / "rows").glob(".*.tmp")) and not (out / HOLDER_NAME).exists()


def test_second_writer_on_the_same_folder_exits_at_once_naming_the_holder(tmp_path):
    out, marker = tmp_path / "res", tmp_path / "go"
    cfg = tmp_path / "wait.toml"
    cfg.write_text(f'methods = ["wait_for"]\n[method.wait_for]\nmarker = "{marker}"\n')
    args = ["run", *TINY, "--config", str(cfg), "--out", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "bench", *args], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not (out / HOLDER_NAME).exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        t0 = time.monotonic()
        second = bench_cli(*args)
        took = time.monotonic() - t0
    finally:
        marker.write_text("go")  # let the first writer finish
        stdout, stderr = first.communicate(timeout=90)
    # told: one line naming the holder (pid, host, start time, command); nothing run, nothing written
    assert second.returncode == 2, second.stderr
    err = second.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "in use by another writer" in err and f"pid {first.pid}" in err and socket.gethostname() in err
    assert "since 20" in err and "bench run" in err
    assert took < 30
    # kept: the first writer is undisturbed and its run is the only one recorded
    assert first.returncode == 0, stderr
    assert done_counts(stdout)["ok"] == 1
    assert len(rows_by_id(out)) == 1
    assert len((out / "invocations.jsonl").read_text().splitlines()) == 1
    assert not (out / HOLDER_NAME).exists()  # released: the next call may write
    assert main(["run", *TINY, "--config", str(cfg), "--out", str(out)]) == 0


def test_lock_left_by_a_dead_process_is_taken_over(tmp_path, capsys):
    out = tmp_path / "res"
    out.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / HOLDER_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                               "started_at": "2020-01-01T00:00:00+00:00", "command": "old"}))
    with results_writer(out, "new"):
        holder = json.loads((out / HOLDER_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["command"] == "new"
    err = capsys.readouterr().err
    assert f"pid {dead.pid}" in err and "not running" in err and "taking it over" in err
    assert not (out / HOLDER_NAME).exists()


# ------------------------------------------------------------------------------------------ damaged results
def test_truncated_and_partial_row_files_are_reported_not_counted_and_redone(tmp_path, capsys):
    out = tmp_path / "res"
    args = ["run", *TINY, "--methods", "dense", "--seeds", "0,1,2", "--out", str(out)]
    assert main(args) == 0
    rows = sorted((out / "rows").glob("*.json"))
    assert len(rows) == 3
    truncated = rows[1]
    good = {p.name: json.loads(p.read_text()) for p in rows if p != truncated}
    truncated.write_bytes(truncated.read_bytes()[:200])
    partial = out / "rows" / "abc.json"
    partial.write_text('{"run_id": "abc"}')
    capsys.readouterr()

    # merge only reads: each bad file named, neither counted, the source folder untouched
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*"))
    assert main(["merge", str(out), "--out", str(tmp_path / "merged")]) == 0
    cap = capsys.readouterr()
    assert str(truncated) in cap.err and "not valid JSON" in cap.err
    assert str(partial) in cap.err and "missing status, dataset, method, seed" in cap.err
    assert "2 runs" in cap.out
    assert len(pd.read_parquet(tmp_path / "merged" / "runs.parquet")) == 2
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*")) == before

    # the next run names both files again and redoes only the run whose row was damaged
    assert main(args) == 0
    cap = capsys.readouterr()
    assert str(truncated) in cap.err and str(partial) in cap.err
    assert done_counts(cap.out) == {"ok": 1, "failed": 0, "diverged": 0, "infeasible": 0, "skipped_finished": 2}
    assert json.loads(truncated.read_text())["status"] == "ok"  # replaced by the redone run
    assert all(json.loads((out / "rows" / n).read_text()) == r for n, r in good.items())  # kept as they were
    df = pd.read_parquet(out / "runs.parquet")
    assert len(df) == 3 and "abc" not in set(df.run_id)


def test_truncated_parquet_is_rebuilt_from_rows_by_report_and_merge(tmp_path, capsys):
    out = tmp_path / "res"
    assert main(["run", *TINY, "--methods", "dense", "--seeds", "0,1", "--out", str(out)]) == 0
    parquet = out / "runs.parquet"
    parquet.write_bytes(parquet.read_bytes()[:100])
    capsys.readouterr()

    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    cap = capsys.readouterr()
    assert f"{parquet} cannot be read" in cap.err and "rebuilt the table from" in cap.err and "(2 rows)" in cap.err
    assert "Runs: 2" in (tmp_path / "rep" / "LEADERBOARD.md").read_text()
    assert len(parquet.read_bytes()) == 100  # report never writes into the results folder

    (out / "runs.csv").unlink()
    for row in (out / "rows").glob("*.json"):
        row.unlink()
    assert main(["merge", str(out), "--out", str(tmp_path / "m")]) == 2  # nothing left to rebuild from
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot be read" in err and "no valid rows" in err

    # a rerun of the sweep repairs the folder
    assert main(["run", *TINY, "--methods", "dense", "--seeds", "0,1", "--out", str(out)]) == 0
    assert len(pd.read_parquet(parquet)) == 2


# ------------------------------------------------------------------------------------------ caught before training
@pytest.mark.parametrize("where", ["/proc/kan-bench-out", "a file"])
def test_unwritable_or_file_output_is_one_line_before_training(tmp_path, capsys, no_training, where):
    if where == "a file":
        where = tmp_path / "results.txt"
        where.write_text("not a folder")
    t0 = time.monotonic()
    one_line_error(capsys, ["run", *TINY, "--methods", "dense", "--out", str(where)], str(where))
    assert time.monotonic() - t0 < 10
    one_line_error(capsys, ["merge", str(tmp_path), "--out", str(where)], str(where))


def test_plugin_that_raises_on_import_is_one_line(tmp_path, capsys, no_training):
    bad = tmp_path / "broken.py"
    bad.write_text("raise RuntimeError('broken on purpose')\n")
    one_line_error(capsys, ["run", *TINY, "--plugin", str(bad), "--out", str(tmp_path / "o")], str(bad),
                   "RuntimeError: broken on purpose")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("registers,name,builtin", [
    ("from bench.compression.methods import Method, register_method\n@register_method('quantize')\n"
     "class Q(Method):\n    pass\n", "method 'quantize'", "methods/quantize.py"),
    ("from bench.data import Dataset, register_dataset\n@register_dataset('digits')\nclass D(Dataset):\n    pass\n",
     "dataset 'digits'", "datasets/digits.py"),
    ("from bench.model.bases import Basis, register_basis\n@register_basis('rbf')\nclass B(Basis):\n    pass\n",
     "basis 'rbf'", "bench/model/bases.py"),
    ("from bench.model.sources import EdgeSource, register_source\n@register_source\nclass DenseSource(EdgeSource):\n"
     "    pass\n", "source 'DenseSource'", "bench/model/sources.py"),
])
def test_plugin_reregistering_a_builtin_name_names_both_files(tmp_path, capsys, no_training, registers, name,
                                                               builtin):
    from bench.compression.methods import METHODS
    from bench.data import DATASETS
    from bench.model.bases import BASES
    from bench.model.sources import SOURCES

    before = {k: dict(t) for k, t in (("m", METHODS), ("d", DATASETS), ("b", BASES), ("s", SOURCES))}
    plugin = tmp_path / "clash.py"
    plugin.write_text(registers)
    one_line_error(capsys, ["run", *TINY, "--plugin", str(plugin), "--out", str(tmp_path / "o")],
                   f"{name} is registered twice", str(ROOT / builtin), str(plugin))
    after = {k: dict(t) for k, t in (("m", METHODS), ("d", DATASETS), ("b", BASES), ("s", SOURCES))}
    assert after == before  # the built-in is kept


def test_reloading_the_same_plugin_file_is_idempotent(tmp_path):
    from bench.compression.methods import METHODS

    plugin = tmp_path / "mine.py"
    plugin.write_text("from bench.compression.methods import Method, register_method\n@register_method('mine_once')\n"
                      "class Mine(Method):\n    pass\n")
    try:
        load_plugin_file(plugin)
        cls = METHODS["mine_once"]
        link = tmp_path / "link.py"
        link.symlink_to(plugin)
        load_plugins([plugin, link, tmp_path])  # the same file by three paths: loaded once, no clash
        assert METHODS["mine_once"] is cls
    finally:
        METHODS.pop("mine_once", None)  # keep `--methods all` of later tests as it was


@pytest.mark.parametrize("argv,fragments", [
    (["--datasets", ""], ["no datasets given"]),
    (["--methods", ""], ["no methods given"]),
    (["--seeds", ""], ["no seeds given"]),
    (["--epochs", "0"], ["epochs=0 is out of range"]),
    (["--models", "convkan", "--datasets", "tiny_regression"],
     ["nothing to run for model 'convkan'", "needs an image dataset", "'tiny_regression'"]),
    (["--models", "convkan", "--datasets", "tiny_images,tiny_regression"],
     ["nothing to run for dataset 'tiny_regression'", "needs an image dataset"]),
    (["--executor", "ray", "--ray-num-cpus", "0"], ["--ray-num-cpus 0 is out of range"]),
])
def test_input_mistakes_are_one_line_before_training(tmp_path, capsys, no_training, argv, fragments):
    one_line_error(capsys, ["run", *TINY, "--methods", "dense", *argv, "--out", str(tmp_path / "o")], *fragments)
    assert not (tmp_path / "o").exists()


def test_sweep_with_some_incompatible_pairs_runs_the_rest_and_says_which(tmp_path, capsys):
    argv = [a for a in TINY if a != "--quiet"]
    assert main(["run", *argv, "--datasets", "tiny_images,tiny_regression", "--models", "kan,convkan",
                 "--methods", "dense", "--out", str(tmp_path / "o")]) == 0
    assert "skipping incompatible dataset/model pairs: tiny_regression/convkan" in capsys.readouterr().out
    assert len(rows_by_id(tmp_path / "o")) == 3


@pytest.mark.parametrize("argv,fragments", [
    (["--tolerance", "-5"], ["--tolerance -5 is out of range"]),
    (["--rmse-tolerance", "-0.1"], ["--rmse-tolerance -0.1 is out of range"]),
])
def test_report_option_mistakes(tmp_path, capsys, argv, fragments):
    one_line_error(capsys, ["report", str(tmp_path), *argv], *fragments)


def test_report_on_a_missing_folder_or_a_file_is_one_line(tmp_path, capsys):
    one_line_error(capsys, ["report", str(tmp_path / "nope")], "not found")
    f = tmp_path / "notes.txt"
    f.write_text("x")
    one_line_error(capsys, ["report", str(f)], "is a file, not a results folder")
    one_line_error(capsys, ["merge", str(f), "--out", str(tmp_path / "m")], "is a file, not a results folder")
    one_line_error(capsys, ["merge", str(tmp_path), "--out", str(tmp_path)], "is one of the folders being merged")


# ------------------------------------------------------------------------------------------ failures visible
def test_failed_diverged_and_infeasible_runs_are_told_with_reason_and_row_file(tmp_path, capsys):
    out = tmp_path / "res"
    args = ["run", *TINY, "--methods", "dense,nan_out,explode,impossible", "--out", str(out)]
    assert main(args) == 0
    cap = capsys.readouterr().out
    ids = {r["method"]: r["run_id"] for r in rows_by_id(out).values()}
    rows = rows_by_id(out)
    assert rows[ids["nan_out"]]["status"] == "diverged"
    assert "runs not ok: 1 failed, 1 diverged, 1 infeasible" in cap
    table = cap[cap.index("runs not ok"):].splitlines()
    for method, status, reason in (("nan_out", "diverged", "non-finite"), ("explode", "failed", "boom on purpose"),
                                   ("impossible", "infeasible", "impossible on purpose")):
        (line,) = [ln for ln in table if f"/{method}()/" in ln]
        assert line.split()[0] == status and reason in line and str(out / "rows" / f"{ids[method]}.json") in line
    full = rows[ids["explode"]]["traceback"]  # the full error is in the row file
    assert full.startswith("Traceback") and "boom on purpose" in full
    assert "traceback" not in pd.read_parquet(out / "runs.parquet").columns

    # redone: failed and diverged runs are tried again, infeasible and ok ones are not; --strict exits 1
    assert main([*args, "--strict"]) == 1
    counts = done_counts(capsys.readouterr().out)
    assert counts == {"ok": 0, "failed": 1, "diverged": 1, "infeasible": 0, "skipped_finished": 2}


def test_invocations_log_keeps_every_call(tmp_path, capsys, monkeypatch):
    import bench.run.runner as runner

    out = tmp_path / "res"
    args = ["run", *TINY, "--methods", "dense", "--seeds", "0,1", "--out", str(out)]
    real = runner.run_one

    def interrupted(spec, env):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_one", interrupted)
    assert main(args) == 130
    monkeypatch.setattr(runner, "run_one", real)
    assert main(args) == 0
    assert main(args) == 0
    calls = [json.loads(line) for line in (out / "invocations.jsonl").read_text().splitlines()]
    assert [c["outcome"] for c in calls] == ["interrupted", "finished", "finished"]
    assert [c["counts"].get("ok") for c in calls] == [None, 2, 0]
    assert all(c["command"].startswith("python -m bench") and c["wall_seconds"] >= 0 for c in calls)
    assert main(["report", str(out)]) == 0
    board = (out / "LEADERBOARD.md").read_text()
    assert board.count("Sweep call: `python -m bench") == 3 and "ended interrupted" in board
    # every call records the machine's speed probe: at its start, and at its end when it finished
    assert "end" not in calls[0]["speed_probe"] and all("end" in c["speed_probe"] for c in calls[1:])
    assert all(c["speed_probe"]["start"]["kan_ms"] > 0 and c["speed_probe"]["start"]["mlp_ms"] > 0 for c in calls)
    assert board.count("Machine speed during that call (a training step at batch 128 of `kan [784, 64, 10]`") == 3
    start = calls[1]["speed_probe"]["start"]
    assert f"at the start (cpu, {start['threads']} threads, {start['features']} features) KAN " \
           f"{start['kan_ms']:.2f} ms, MLP {start['mlp_ms']:.2f} ms" in board


def test_an_interrupt_during_the_speed_probe_stops_the_call_before_any_run(tmp_path, monkeypatch):
    """The machine speed probe never fails a call, but Ctrl-C during it stops the call as anywhere else."""
    import bench.run.perf as perf

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(perf, "speed_probe", interrupted)
    out = tmp_path / "res"
    assert main(["run", *TINY, "--methods", "dense", "--seeds", "0", "--out", str(out)]) == 130
    assert not (out / "rows").exists() or not list((out / "rows").glob("*.json"))
