"""Executors: the same sweep through local, Ray (2 CPUs) and submitit's local executor gives the same rows;
a worker killed mid-sweep loses only its run and a rerun completes it; merge dedupes by run_id."""

import json
import sys
from pathlib import Path

import pandas as pd
import pytest

from bench.cli import main
from bench.run.executors import ExecutorOptions, run_with_executor, start_ray
from bench.run.merge import merge_results
from bench.run.plan import plan_sweep
from bench.run.results import ResultsStore
from bench.run.runner import run_sweep
from bench.run.sweep import build_sweep

pytest.importorskip("ray")
pytest.importorskip("submitit")

PLUGINS = Path(__file__).parent / "plugins"
TRAIN = {"epochs": 1, "finetune_epochs": 1, "batch_size": 32, "lr": 3e-3}


def sweep_of(methods, method_tables=None, name="ex"):
    return build_sweep({"name": name, "datasets": ["tiny_regression"], "models": ["kan"], "bases": ["bspline"],
                        "methods": methods, "method": method_tables or {}, "seeds": [0], "train": dict(TRAIN),
                        "device": "cpu"})


@pytest.fixture(scope="module")
def ray_cluster():
    ray = start_ray(num_cpus=2)
    yield ray
    ray.shutdown()


def opts(**kw):
    return ExecutorOptions(plugins=[str(PLUGINS)], **kw)


def by_id(folder):
    return {r["run_id"]: r for r in ResultsStore(folder).rows()}


def test_ray_and_submitit_give_the_same_rows_as_local(tmp_path, ray_cluster, monkeypatch):
    # dense + two runs sharing one stage-1 model (own_stage tag=0, knob 0 and 1): 3 runs, 2 models to train
    import bench.run.executors as executors
    import bench.run.runner as runner

    sweep = sweep_of(["dense", "own_stage"], {"own_stage": {"knob": [0, 1]}})
    assert len(sweep.runs) == 3
    plan = plan_sweep(sweep, tmp_path / "ray")
    assert len(plan.stages) == 2 and sorted(len(v) for v in plan.needs.values()) == [1, 2, 2]

    # every backend executes the very plan object plan_sweep made for its call, and nothing re-plans
    made, executed = [], []

    def planned(*args, **kw):
        made.append(plan_sweep(*args, **kw))
        return made[-1]

    def spy(name, real, index):
        def wrapper(*args, **kw):
            executed.append((name or args[0], args[index]))
            return real(*args, **kw)
        return wrapper

    monkeypatch.setattr(runner, "plan_sweep", planned)
    monkeypatch.setattr(executors, "plan_sweep", planned)
    monkeypatch.setattr(runner, "run_plan", spy("local", runner.run_plan, 0))
    monkeypatch.setattr(executors, "run_distributed", spy(None, executors.run_distributed, 2))
    local = run_sweep(sweep, tmp_path / "local", tmp_path / "data", quiet=True)
    ray_counts = run_with_executor("ray", sweep, tmp_path / "ray", tmp_path / "data", quiet=True, options=opts())
    slurm = run_with_executor("slurm", sweep, tmp_path / "slurm", tmp_path / "data", quiet=True,
                              options=opts(slurm_local=True, poll_seconds=0.2))
    assert local["ok"] == ray_counts["ok"] == slurm["ok"] == 3
    assert [name for name, _ in executed] == ["local", "ray", "slurm"] and len(made) == 3
    assert all(got is want for (_, got), want in zip(executed, made))
    assert all([s.run_id for s in p.runs] == [s.run_id for s in sweep.runs] for p in made)
    assert all({k: s.files for k, s in p.stages.items()} == {k: s.files for k, s in plan.stages.items()}
               for p in made)

    ref = by_id(tmp_path / "local")
    for folder in ("ray", "slurm"):
        rows = by_id(tmp_path / folder)
        assert rows.keys() == ref.keys()
        for rid, row in rows.items():
            for col in ("status", "stored_bits", "compression_ratio", "dense_metric", "val_metric"):
                assert row[col] == ref[rid][col], (folder, col)
            assert row["metric"] == pytest.approx(ref[rid]["metric"], rel=1e-5, abs=1e-7), folder
            assert row["host"] and row["device"] == "cpu"
        # phase 1 wrote exactly the cached models the plan predicted (the dense base, its fine-tuned
        # control and one stage-1 model)
        predicted = {f for stage in plan.stages.values() for f in stage.files}
        assert {p.name for p in (tmp_path / folder / "cache").glob("*.pt")} == predicted
        assert len(pd.read_parquet(tmp_path / folder / "runs.parquet")) == 3


def _crash_sweep_file(tmp_path, seeds):
    cfg = tmp_path / "crash.toml"
    marker = tmp_path / "crashed.marker"
    cfg.write_text(f'name = "crash"\ndatasets = ["tiny_regression"]\nmodels = ["kan"]\nbases = ["bspline"]\n'
                   f'methods = ["dense", "crash_once"]\nseeds = {seeds}\ndevice = "cpu"\n'
                   f'[train]\nepochs = 1\nfinetune_epochs = 1\nbatch_size = 32\n'
                   f'[method.crash_once]\nmarker = "{marker}"\n')
    return cfg, marker


@pytest.mark.parametrize("executor", ["ray", "slurm"])
def test_killed_worker_loses_only_its_run_and_rerun_completes(tmp_path, ray_cluster, executor, capsys):
    seeds = [0, 1] if executor == "ray" else [0]  # each submitit-local job is a fresh Python: keep it to 2
    cfg, marker = _crash_sweep_file(tmp_path, seeds)
    n = 2 * len(seeds)
    out = tmp_path / "out"
    argv = ["run", "--config", str(cfg), "--out", str(out), "--data-dir", str(tmp_path), "--plugin", str(PLUGINS),
            "--quiet", "--no-report", "--executor", executor] + (["--slurm-local"] if executor == "slurm" else [])
    assert main(argv) == 0
    assert marker.exists()  # the crash_once worker really died (os._exit) mid-run
    first = by_id(out)
    assert len(first) == n
    failed = [r for r in first.values() if r["status"] != "ok"]
    assert len(failed) == 1 and failed[0]["method"] == "crash_once" and failed[0]["status"] == "failed"
    assert "lost" in failed[0]["error"]
    assert f"{n - 1} ok, 1 failed" in capsys.readouterr().out

    assert main(argv) == 0  # the rerun retries only the lost run, which now completes
    assert f"1 ok, 0 failed, 0 diverged, {n - 1} already finished" in capsys.readouterr().out
    second = by_id(out)
    assert all(r["status"] == "ok" for r in second.values()) and second.keys() == first.keys()
    for rid, row in first.items():
        if row["status"] == "ok":  # finished rows were not rerun
            assert second[rid]["started_at"] == row["started_at"] and second[rid]["metric"] == row["metric"]
    assert len(pd.read_parquet(out / "runs.parquet")) == n


def _row(rid, status, finished, host, metric):
    row = {"run_id": rid, "sweep": "s", "dataset": "d", "method": "dense", "seed": 0, "status": status,
           "metric": metric, "finished_at": finished, "started_at": finished, "host": host,
           "device": f"cuda:{host[-1]}"}
    if status == "ok":  # what every ok row carries (the results schema)
        row.update(metric_name="accuracy", val_metric=metric, stored_bits=64, dense_bits=64, compression_ratio=1.0)
    return row


def test_merge_dedupes_by_run_id_and_keeps_provenance(tmp_path, capsys):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    sa, sb = ResultsStore(a), ResultsStore(b)
    sa.add(_row("x", "ok", "2026-01-01T00:00:00+00:00", "node1", 10.0))
    sa.add(_row("y", "failed", "2026-01-03T00:00:00+00:00", "node1", None))
    sa.add(_row("z", "ok", "2026-01-01T00:00:00+00:00", "node1", 30.0))
    sb.add(_row("x", "ok", "2026-01-02T00:00:00+00:00", "node2", 11.0))  # later ok row wins
    sb.add(_row("y", "ok", "2026-01-01T00:00:00+00:00", "node2", 20.0))  # ok beats a later failure
    # a folder that only has runs.parquet (rows/ not copied back from the cluster)
    sc = ResultsStore(c)
    sc.add(_row("w", "ok", "2026-01-01T00:00:00+00:00", "node3", 40.0))
    for p in (c / "rows").glob("*.json"):
        p.unlink()
    (c / "rows").rmdir()

    assert main(["merge", str(a), str(b), str(c), "--out", str(tmp_path / "m")]) == 0
    assert "4 runs (2 duplicate rows dropped)" in capsys.readouterr().out
    df = pd.read_parquet(tmp_path / "m" / "runs.parquet").set_index("run_id")
    assert sorted(df.index) == ["w", "x", "y", "z"]
    assert df.loc["x", "metric"] == 11.0 and df.loc["x", "host"] == "node2" and df.loc["x", "device"] == "cuda:2"
    assert df.loc["y", "status"] == "ok" and df.loc["y", "metric"] == 20.0 and df.loc["y", "host"] == "node2"
    assert df.loc["z", "host"] == "node1" and df.loc["w", "host"] == "node3" and df.loc["w", "metric"] == 40.0
    assert df.loc["x", "source"] == str(b.resolve())
    json.loads((tmp_path / "m" / "rows" / "w.json").read_text())  # plain JSON, numpy values converted
    assert merge_results([a], tmp_path / "m2") == {"rows": 3, "duplicates": 0, "folders": 1}


@pytest.mark.parametrize("executor,module,extra", [("ray", "ray", "ray"), ("slurm", "submitit", "slurm")])
def test_missing_extra_is_one_line(tmp_path, monkeypatch, capsys, executor, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    code = main(["run", "--datasets", "tiny_regression", "--methods", "dense", "--plugin", str(PLUGINS),
                 "--out", str(tmp_path), "--executor", executor])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"pip install -e '.[{extra}]'" in err


def test_executor_flags_need_their_executor(tmp_path, capsys):
    code = main(["run", "--datasets", "tiny_regression", "--methods", "dense", "--plugin", str(PLUGINS),
                 "--out", str(tmp_path), "--ray-address", "auto"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "error: --ray-address: only valid with --executor ray"
    assert main(["run", "--executor", "slurm", "--methods", "dense", "--out", str(tmp_path)]) == 2
    assert "--slurm-local" in capsys.readouterr().err  # no sbatch on this machine: says how to run locally
