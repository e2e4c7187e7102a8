"""Executors: where the runs of a sweep execute.

- ``local``: the plan's runs in this process, in sweep order (:func:`bench.run.runner.run_plan`).
- ``ray``: every run is a Ray task (``num_gpus=1`` on CUDA, ``--ray-num-cpus`` CPUs), on a local Ray
  started on the spot or an existing cluster (``--ray-address``).
- ``slurm``: every run is one element of a SLURM job array submitted with ``submitit``
  (``--slurm-local`` uses submitit's local executor: same code path, subprocesses on this machine).

Every executor runs the same :class:`~bench.run.plan.Plan` (:func:`bench.run.plan.plan_sweep`: what is finished,
what to run, which cached models to train). Both distributed executors work in two phases that share the
results folder (which must be on a filesystem every worker sees): phase 1 trains each of the plan's
stages once (the dense base of every (dataset, model, basis, seed, budget) with the control of each
fine-tune budget, and every distinct stage-1 model of the methods that train their own), writing
``<out>/cache/*.pt`` atomically; phase 2 runs :func:`bench.run.runner.run_one` per run, which then only
loads those caches. With Ray a run starts as soon as the models it needs exist; with SLURM
phase 2 is a second job array submitted when phase 1 has finished.

The driver (this process) writes each row into the :class:`~bench.run.results.ResultsStore` the moment its
run returns, so killing the driver or losing a worker loses only unfinished runs, and rerunning the same
command resumes exactly as with ``local`` (finished ``ok`` runs are skipped, failed ones retried). A run
whose worker dies (out of memory, node lost, ``os._exit``) is recorded as ``failed``, never retried
behind the user's back. Workers run the sweep's ``--plugin`` files before anything else.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.errors import UserError

from .lock import results_writer
from .plan import Plan, plan_sweep

EXECUTORS = ("local", "ray", "slurm")
EXTRAS = {"ray": ("ray", "ray"), "slurm": ("submitit", "slurm")}  # executor -> (module, pip extra)


@dataclass
class ExecutorOptions:
    """What the distributed executors need beyond the sweep (CLI flags)."""

    plugins: list[str] = field(default_factory=list)  # --plugin paths, loaded by every worker
    ray_address: str | None = None  # None: start a local Ray on this machine
    ray_num_cpus: float = 1.0  # CPUs reserved per run (and torch threads in the worker)
    slurm_partition: str | None = None
    slurm_gpus: int | None = None  # GPUs per job; None: 1 on a real cluster, 0 with slurm_local
    slurm_time: int = 60  # minutes per job
    slurm_cpus: int = 2  # CPUs per job
    slurm_local: bool = False  # submitit's LocalExecutor instead of sbatch (tests, debugging)
    poll_seconds: float | None = None  # how often the slurm driver polls its jobs


def require(executor: str):
    """Import the optional engine of ``executor`` or fail with one line saying what to install."""
    module, extra = EXTRAS[executor]
    try:
        return __import__(module)
    except ImportError:
        raise UserError(f"--executor {executor} needs the {module!r} package: pip install -e '.[{extra}]'") from None


def _pythonpath() -> str:
    from bench.registry import REPO_ROOT

    old = os.environ.get("PYTHONPATH", "")
    return str(REPO_ROOT) + (os.pathsep + old if old else "")


# ---------------------------------------------------------------------------------------- worker side
_ENV_CACHE: dict = {}


def _worker_env(out: str, data_dir: str, device: str, plugins: list[str], threads: int):
    """The per-process RunEnv of a worker (kept between tasks so data splits are loaded once)."""
    import torch

    from bench.registry import load_plugins

    from .runner import RunEnv

    load_plugins(plugins)
    if threads:
        torch.set_num_threads(max(1, int(threads)))
    key = (out, data_dir, device)
    if key not in _ENV_CACHE:
        _ENV_CACHE.clear()
        _ENV_CACHE[key] = RunEnv(out, data_dir, device, progress=False)
    return _ENV_CACHE[key]


def prepare_stage(spec: dict, own_model: bool, out: str, data_dir: str, device: str, plugins: list[str],
                  threads: int = 1) -> dict:
    """Phase 1 task: train (or find cached) the dense base, or the method's own stage-1 model."""
    from bench.compression.pipeline import method_class

    from .runner import error_text
    from .sweep import RunSpec
    from .train import Diverged

    t0 = time.perf_counter()
    try:
        env = _worker_env(out, data_dir, device, plugins, threads)
        run = RunSpec(**spec)
        ds, splits = env.splits(run)
        trainer = env.trainer(run, ds, splits)
        method = method_class(run.method)(**run.method_config) if own_model else None
        model, _ = env.trained(run, ds, trainer, method)
        if method is None:  # the base's fine-tuned control, which every run of this base reads
            env.control(run, trainer, model)
        status, error = "ok", None
    except Diverged as exc:
        status, error = "diverged", str(exc)
    except Exception as exc:
        status, error = "failed", error_text(exc)
    return {"status": status, "error": error, "host": socket.gethostname(), "seconds": time.perf_counter() - t0}


def execute_run(spec: dict, out: str, data_dir: str, device: str, plugins: list[str], threads: int = 1) -> dict:
    """Phase 2 task: one run, RunSpec (as a dict) in, results row out; errors become rows as in ``local``."""
    from .runner import error_row, run_one
    from .sweep import RunSpec

    run = RunSpec(**spec)
    try:
        env = _worker_env(out, data_dir, device, plugins, threads)
        return run_one(run, env)
    except Exception as exc:
        return error_row(run, exc)


class _Progress:
    """A tqdm bar over runs with finished / running / failed counts (nothing when quiet)."""

    def __init__(self, total: int, quiet: bool, log):
        self.quiet, self.log = quiet, log
        self.counts = {"ok": 0, "failed": 0, "diverged": 0, "infeasible": 0}
        self.running = self.preparing = 0  # submitted and not yet returned
        self.slots = None  # how many tasks can execute at once, where known (Ray); the rest are queued
        self.bar = None
        if not quiet:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="runs", unit="run")

    def show(self) -> None:
        if self.bar is not None:
            bad = self.counts["failed"] + self.counts["diverged"]
            prep, run, queued = self.preparing, self.running, 0
            if self.slots is not None:
                prep = min(self.preparing, self.slots)
                run = min(self.running, self.slots - prep)
                queued = self.preparing + self.running - prep - run
            parts = ([f"training base models {prep}"] if prep else []) + [f"running {run}"]
            parts += ([f"queued {queued}"] if queued else []) + [f"failed {bad}"]
            self.bar.set_postfix_str(", ".join(parts))

    def row(self, row: dict, label: str) -> None:
        self.counts[row["status"]] = self.counts.get(row["status"], 0) + 1
        if self.bar is not None:
            self.bar.update(1)
            self.show()
        elif row["status"] not in ("ok", "infeasible") and not self.quiet:
            self.log(f"run {label} {row['status']}: {row['error']}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _crash_text(exc: BaseException, where: str) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{where} lost: {type(exc).__name__}: {first}"[:500]


def _dependency_row(spec, prep: dict):
    from .runner import failed_row

    return failed_row(spec, prep["status"], f"{prep['what']} training {prep['status']}: {prep['error']}")


# ---------------------------------------------------------------------------------------- entry point
def run_with_executor(executor: str, sweep, out: str | Path, data_dir: str | Path, quiet: bool = False,
                      device: str | None = None, options: ExecutorOptions | None = None, log=print) -> dict:
    """Plan ``sweep`` once (:func:`bench.run.plan.plan_sweep`) and run the plan with ``executor``;
    returns counts by status like ``run_sweep``."""
    from .runner import run_sweep

    if executor not in EXECUTORS:
        raise UserError(f"unknown executor {executor!r}; valid: {', '.join(EXECUTORS)}")
    if executor == "local":
        return run_sweep(sweep, out, data_dir, quiet=quiet, device=device, log=log)
    engine = require(executor)
    with results_writer(out):
        plan = plan_sweep(sweep, Path(out).resolve())
        return run_distributed(executor, engine, plan, Path(data_dir).resolve(), quiet, device or sweep.device,
                               options or ExecutorOptions(), log)


def run_distributed(executor: str, engine, plan: Plan, data_dir: Path, quiet: bool, device: str,
                    options: ExecutorOptions, log) -> dict:
    """The ``ray`` and ``slurm`` backends: the plan's stages, then its runs, on workers; each row
    is stored the moment it arrives. Returns counts by status."""
    from .results import ResultsStore

    out = plan.out
    store = ResultsStore(out)
    store.remove_partial_writes()
    plugins = [str(Path(p).resolve()) for p in options.plugins]
    runner = _run_ray if executor == "ray" else _run_slurm
    plan.announce(f"({len(plan.stages)} models to train first) with {executor}", log, quiet)
    started_ray = executor == "ray" and bool(plan.runs) and not engine.is_initialized()
    if started_ray:  # before the progress bar: connecting may fail with one line
        start_ray(options.ray_address, quiet=quiet)
    progress = _Progress(len(plan.runs), quiet, log)
    try:
        if plan.runs:
            runner(engine, plan, store, out, data_dir, device, plugins, options, progress)
    finally:
        progress.close()
        store.flush()
        if started_ray:
            engine.shutdown()
    return {**progress.counts, "skipped_finished": plan.finished}


# ---------------------------------------------------------------------------------------- ray
def start_ray(address: str | None = None, num_cpus: int | None = None, quiet: bool = True):
    """Connect to ``address`` or start a local Ray; workers can import ``bench`` from this checkout."""
    ray = require("ray")
    kwargs = {"include_dashboard": False, "log_to_driver": not quiet,
              "runtime_env": {"env_vars": {"PYTHONPATH": _pythonpath()}}}
    if address:
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            raise UserError(f"cannot connect to the Ray cluster at {address!r}: {first}") from None
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), **kwargs)
    return ray


def _ray_resources(ray, device: str, options: ExecutorOptions) -> tuple[dict, str, int]:
    total = ray.cluster_resources()
    gpus = total.get("GPU", 0)
    if device == "cuda" and gpus < 1:
        raise UserError("--device cuda but the Ray cluster has no GPU; use --device cpu or auto")
    use_gpu = device == "cuda" or (device == "auto" and gpus >= 1)
    if options.ray_num_cpus <= 0 or options.ray_num_cpus > total.get("CPU", 0):
        raise UserError(f"--ray-num-cpus {options.ray_num_cpus:g} must be > 0 and at most the cluster's "
                        f"{total.get('CPU', 0):g} CPUs")
    resources = {"num_cpus": options.ray_num_cpus, "num_gpus": 1 if use_gpu else 0, "max_retries": 0}
    slots = int(total.get("CPU", 0) // options.ray_num_cpus)
    slots = min(slots, int(gpus)) if use_gpu else slots
    return resources, "cuda" if use_gpu else "cpu", max(1, slots)


def _run_ray(ray, plan: Plan, store, out, data_dir, device, plugins, options, progress) -> None:
    pending: dict = {}
    try:
        resources, worker_device, progress.slots = _ray_resources(ray, device, options)
        threads = max(1, int(options.ray_num_cpus))
        common = (str(out), str(data_dir), worker_device, plugins, threads)
        prep_task = ray.remote(prepare_stage).options(**resources)
        run_task = ray.remote(execute_run).options(**resources)
        prep_result: dict = {}
        waiting = {rid: set(keys) for rid, keys in plan.needs.items()}
        by_id = {s.run_id: s for s in plan.runs}

        def submit_run(spec):
            failed = [prep_result[k] for k in plan.needs[spec.run_id] if prep_result[k]["status"] != "ok"]
            if failed:
                row = _dependency_row(spec, failed[0])
                store.add(row)
                progress.row(row, spec.label())
                return
            pending[run_task.remote(dataclasses.asdict(spec), *common)] = ("run", spec)
            progress.running += 1

        for stage in plan.stages.values():
            pending[prep_task.remote(dataclasses.asdict(stage.spec), stage.own, *common)] = ("prep", stage)
            progress.preparing += 1
        for spec in plan.runs:
            if not waiting[spec.run_id]:
                submit_run(spec)
        progress.show()
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=2.0)
            for ref in ready:
                kind, item = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as exc:  # the worker died (WorkerCrashedError) or the task could not run
                    result = {"status": "failed", "error": _crash_text(exc, "ray worker")}
                if kind == "prep":
                    progress.preparing -= 1
                    prep_result[item.key] = {**result, "what": item.what}
                    for rid, keys in waiting.items():
                        if item.key in keys:
                            keys.discard(item.key)
                            if not keys:
                                submit_run(by_id[rid])
                else:
                    progress.running -= 1
                    row = result if "run_id" in result else _crashed_row(item, result["error"])
                    store.add(row)
                    progress.row(row, item.label())
            progress.show()
    finally:
        for ref in pending:  # interrupted: do not leave orphan tasks running on the cluster
            try:
                ray.cancel(ref, force=True)
            except Exception:
                pass


def _crashed_row(spec, error: str) -> dict:
    from .runner import failed_row

    return failed_row(spec, "failed", error)


# ---------------------------------------------------------------------------------------- slurm (submitit)
def _slurm_executor(submitit, out: Path, device: str, options: ExecutorOptions):
    if not options.slurm_local and shutil.which("sbatch") is None:
        raise UserError("--executor slurm needs `sbatch` on PATH (run it on a SLURM login node), "
                        "or add --slurm-local to run the jobs on this machine")
    cluster = "local" if options.slurm_local else "slurm"
    gpus = options.slurm_gpus if options.slurm_gpus is not None else (0 if options.slurm_local else 1)
    if gpus < 0 or options.slurm_cpus < 1 or options.slurm_time < 1:
        raise UserError("--slurm-gpus must be >= 0, --slurm-cpus and --slurm-time (minutes) >= 1")
    if device == "cuda" and gpus == 0:
        raise UserError("--device cuda needs --slurm-gpus 1 (GPUs per job)")
    executor = submitit.AutoExecutor(folder=out / "slurm" / "%j", cluster=cluster)
    params = {"name": "kanbench", "timeout_min": int(options.slurm_time), "cpus_per_task": int(options.slurm_cpus),
              "gpus_per_node": int(gpus), f"{cluster}_setup": [f"export PYTHONPATH={_pythonpath()}"]}
    if options.slurm_partition and not options.slurm_local:
        params["slurm_partition"] = options.slurm_partition
    executor.update_parameters(**params)
    worker_device = "cuda" if gpus and device in ("auto", "cuda") else ("cpu" if device == "auto" else device)
    return executor, worker_device


def _wait_jobs(jobs: dict, on_done, poll: float) -> None:
    """Poll submitit jobs; call ``on_done(item, result_or_None, error_or_None)`` as each one ends."""
    while jobs:
        for job in [j for j in jobs if j.done()]:
            item = jobs.pop(job)
            try:
                on_done(item, job.result(), None)
            except Exception as exc:  # the job died (killed, out of memory, timeout, node failure)
                on_done(item, None, _crash_text(exc, f"slurm job {job.job_id}"))
        if jobs:
            time.sleep(poll)


def _run_slurm(submitit, plan: Plan, store, out, data_dir, device, plugins, options, progress) -> None:
    executor, worker_device = _slurm_executor(submitit, out, device, options)
    poll = options.poll_seconds or (0.5 if options.slurm_local else 15.0)
    common = (str(out), str(data_dir), worker_device, plugins, options.slurm_cpus)
    jobs: dict = {}
    try:
        prep_result: dict = {}
        if plan.stages:  # phase 1: one job array training every distinct cached model
            stages = list(plan.stages.values())
            specs = [dataclasses.asdict(st.spec) for st in stages]
            owns = [st.own for st in stages]
            arrays = executor.map_array(prepare_stage, specs, owns, *([c] * len(stages) for c in common))
            jobs = dict(zip(arrays, stages))
            progress.preparing = len(jobs)
            progress.show()

            def prep_done(stage, result, error):
                progress.preparing -= 1
                prep_result[stage.key] = {**(result or {"status": "failed", "error": error}), "what": stage.what}
                progress.show()

            _wait_jobs(jobs, prep_done, poll)
        ready = []
        for spec in plan.runs:
            failed = [prep_result[k] for k in plan.needs[spec.run_id] if prep_result[k]["status"] != "ok"]
            if failed:
                row = _dependency_row(spec, failed[0])
                store.add(row)
                progress.row(row, spec.label())
            else:
                ready.append(spec)
        if not ready:
            return
        # phase 2: one job array, one job per run; rows stream into the store as jobs end
        arrays = executor.map_array(execute_run, [dataclasses.asdict(s) for s in ready],
                                    *([c] * len(ready) for c in common))
        jobs = dict(zip(arrays, ready))
        progress.running = len(jobs)
        progress.show()

        def run_done(spec, row, error):
            progress.running -= 1
            row = row if row is not None else _crashed_row(spec, error)
            store.add(row)
            progress.row(row, spec.label())

        _wait_jobs(jobs, run_done, poll)
    finally:
        for job in jobs:  # interrupted: cancel what is still queued or running
            try:
                job.cancel(check=False)
            except Exception:
                pass
