"""``python -m bench run | report | merge | list | transfer | perf | import``.

Every user mistake ends in one line on stderr and exit code 2 (never a traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        raise UserError(f"{message} (see `python -m bench {self.prog.split()[-1]} --help`)"
                        if " " in self.prog else f"{message} (see --help)")


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _methods(value: str) -> list[str]:
    from bench.compression.pipeline import split_methods

    return split_methods(value)


def _seeds(value: str) -> list[int]:
    try:
        return [int(v) for v in _csv(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be comma-separated integers, got {value!r}") from None


def default_data_dir() -> Path:
    return Path(os.environ.get("BENCH_DATA_DIR", "data"))


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bench", description="Benchmark harness for compressing Kolmogorov-Arnold Networks.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    r = sub.add_parser("run", help="run a sweep (default: the bundled 'quick' sweep)")
    src = r.add_mutually_exclusive_group()
    src.add_argument("--config", metavar="FILE", help="sweep TOML file")
    src.add_argument("--sweep", metavar="NAME", help="bundled sweep name (see `bench list`)")
    r.add_argument("--datasets", type=_csv, help="comma-separated dataset names")
    r.add_argument("--models", type=_csv, help="comma-separated model names (kan, convkan)")
    r.add_argument("--bases", type=_csv, help="comma-separated basis names")
    r.add_argument("--methods", type=_methods,
                   help="comma-separated method names, pipelines (\"prune(ratio=2)>kmeans(K=16)\"), or 'all'")
    r.add_argument("--seeds", type=_seeds, help="comma-separated seeds, e.g. 0,1,2")
    r.add_argument("--epochs", type=int, help="training epochs (overrides the sweep)")
    r.add_argument("--finetune-epochs", type=int, dest="finetune_epochs", help="fine-tune budget in epochs")
    r.add_argument("--patience", type=int, help="epochs without a better validation score before training stops "
                                                "(0: never early; overrides the sweep)")
    r.add_argument("--grid", action="store_true", default=None, help="expand every method's hyperparameter grid")
    r.add_argument("--against", metavar="REFERENCE",
                   help="a results or report folder (e.g. reports/cpu): run only what it lacks, reuse its trained "
                        "models when its cache/ is there, check re-trained controls against it, and write the "
                        "combined leaderboard into --out")
    r.add_argument("--base-model", dest="base_model", metavar="FILE",
                   help="every dataset's base model: a model file (python -m bench import writes one; {seed} in the "
                        "name is replaced by the seed), not trained; --models and --bases then do not apply")
    r.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train (default: the sweep's, auto)")
    r.add_argument("--out", metavar="DIR", help="results folder (default: results/<sweep name>)")
    r.add_argument("--data-dir", metavar="DIR", help="dataset cache (default: $BENCH_DATA_DIR or ./data)")
    r.add_argument("--plugin", metavar="PATH", action="append", default=[], help="extra plugin file/folder")
    r.add_argument("--quiet", action="store_true", help="no progress bars (for CI)")
    r.add_argument("--no-report", action="store_true", help="do not write the leaderboard at the end")
    r.add_argument("--strict", action="store_true", help="exit 1 if any run failed or diverged")
    r.add_argument("--dry-run", action="store_true",
                   help="validate and print the plan (runs to do, models to train, epochs) without training")
    ex = r.add_argument_group("executors (where the runs execute)")
    ex.add_argument("--executor", choices=["local", "ray", "slurm"], default="local",
                    help="local: this process (default); ray: one Ray task per run; slurm: a submitit job array")
    ex.add_argument("--ray-address", metavar="ADDR", help="existing Ray cluster, e.g. ray://head:10001 or auto "
                    "(default: start a local Ray)")
    ex.add_argument("--ray-num-cpus", type=float, metavar="N", help="CPUs per run (default 1)")
    ex.add_argument("--slurm-partition", metavar="NAME", help="SLURM partition")
    ex.add_argument("--slurm-gpus", type=int, metavar="N", help="GPUs per job (default 1; 0 with --slurm-local)")
    ex.add_argument("--slurm-time", type=int, metavar="MIN", help="time limit per job in minutes (default 60)")
    ex.add_argument("--slurm-cpus", type=int, metavar="N", help="CPUs per job (default 2)")
    ex.add_argument("--slurm-local", action="store_true", help="run the slurm jobs on this machine with submitit's "
                    "local executor (no cluster needed)")

    rep = sub.add_parser("report", help="write LEADERBOARD.md and plots from a results folder")
    rep.add_argument("results", metavar="RESULTS_DIR")
    rep.add_argument("--out", metavar="DIR", help="where to write (default: RESULTS_DIR)")
    rep.add_argument("--title", help="leaderboard title (default: named after RESULTS_DIR)")
    rep.add_argument("--tolerance", type=float, default=1.0, help="accuracy points from dense that count as "
                     "'no loss' (default 1.0)")
    rep.add_argument("--rmse-tolerance", type=float, default=0.05, help="relative RMSE tolerance (default 0.05)")
    rep.add_argument("--plugin", metavar="PATH", action="append", default=[], help=argparse.SUPPRESS)

    mg = sub.add_parser("merge", help="combine the results folders of several machines into one")
    mg.add_argument("folders", metavar="DIR", nargs="+", help="results folders (each with rows/ or runs.parquet)")
    mg.add_argument("--out", metavar="DIR", required=True, help="merged results folder")
    mg.add_argument("--report", action="store_true", help="also write LEADERBOARD.md and plots into --out")
    mg.add_argument("--plugin", metavar="PATH", action="append", default=[], help=argparse.SUPPRESS)

    pf = sub.add_parser("perf", help="micro-benchmark: KAN vs MLP train/inference, compressed inference, memory")
    pf.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    pf.add_argument("--batch", type=int, default=256)
    pf.add_argument("--widths", type=lambda v: [int(w) for w in _csv(v)], default=[784, 64, 10],
                    help="KAN widths (default 784,64,10)")
    pf.add_argument("--bases", type=_csv, help="comma-separated bases (default: all five)")
    pf.add_argument("--repeats", type=int, default=20, help="timed repeats (median is reported)")
    pf.add_argument("--no-compressed", action="store_true", help="skip the compressed-inference rows")
    pf.add_argument("--conv-channels", type=lambda v: [int(w) for w in _csv(v)] if v else [], default=[16, 32, 64],
                    help="ConvKAN channels for the conv rows (default 16,32,64; empty string: no conv rows)")
    pf.add_argument("--conv-batch", type=int, default=64, help="batch of the ConvKAN rows (default 64)")
    pf.add_argument("--fused", action="store_true",
                    help="also time the ConvKAN step with compiled (the default) against eager basis features")
    pf.add_argument("--anchors", action="store_true",
                    help="also time the public fast KAN layers flashkan and inkan (extra 'anchors'; skipped with a "
                         "reason when not installed) against the same MLP and against the project's bspline KAN")
    pf.add_argument("--out", default="results/perf.csv", help="CSV to write (default results/perf.csv)")

    from bench.run.transfer import (
        DEFAULT_FINETUNE_EPOCHS,
        DEFAULT_PRETRAIN_EPOCHS,
        DEFAULT_RANKS,
        DEFAULT_SEEDS,
        TARGETS,
    )

    tr = sub.add_parser("transfer", help="LoTRA transfer benchmark: pre-train on a source equation, adapt to "
                        "related targets (full fine-tune vs Tucker-update ranks)")
    tr.add_argument("--out", metavar="DIR", default="results/transfer", help="results folder (default: "
                    "results/transfer); a rerun resumes, skipping finished rows")
    tr.add_argument("--seeds", type=_seeds, default=list(DEFAULT_SEEDS), help="comma-separated seeds (default "
                    + ",".join(map(str, DEFAULT_SEEDS)) + ")")
    tr.add_argument("--pretrain-epochs", type=int, default=DEFAULT_PRETRAIN_EPOCHS, dest="pretrain_epochs",
                    help=f"source pre-training epochs (default {DEFAULT_PRETRAIN_EPOCHS})")
    tr.add_argument("--finetune-epochs", type=int, default=DEFAULT_FINETUNE_EPOCHS, dest="finetune_epochs",
                    help=f"epochs of every adaptation (default {DEFAULT_FINETUNE_EPOCHS})")
    tr.add_argument("--ranks", nargs="+", metavar="R1,R2,R3", default=[",".join(map(str, r)) for r in DEFAULT_RANKS],
                    help="LoTRA rank triples (out,in,basis); ints absolute (capped per layer at the mode size), "
                    "numbers with a point fractions (default: " + " ".join(",".join(map(str, r)) for r in
                                                                        DEFAULT_RANKS) + ")")
    tr.add_argument("--targets", nargs="+", metavar="a=..,b=..", default=list(TARGETS),
                    help="target tasks of exp(sin(a pi x1) + b x2^2); the source is a=1,b=1 (default: "
                    + " ".join(TARGETS) + ")")
    tr.add_argument("--lr-rule", choices=["balanced", "shared"], default="balanced", dest="lr_rule",
                    help="LoTRA learning rates per Tucker component (default balanced)")
    tr.add_argument("--quiet", action="store_true", help="no progress bars (for CI)")
    tr.add_argument("--no-report", action="store_true", help="do not write the leaderboard at the end")

    im = sub.add_parser("import", help="import a model trained by pykan, efficient-kan, FastKAN, torch-conv-kan "
                                       "or ChebyKAN into the project's model file (exact, checked)")
    im.add_argument("file", metavar="FILE",
                    help="an interop file (describes itself), a bare state_dict (needs --from), or a pykan "
                         "saveckpt prefix (PREFIX_config.yml + PREFIX_state)")
    im.add_argument("--out", required=True, metavar="MODEL.kanb", help="the project model file to write")
    im.add_argument("--from", dest="library", metavar="LIBRARY",
                    help="efficient-kan, fast-kan, pykan, torch-conv-kan or ChebyKAN")
    im.add_argument("--constructor", metavar="JSON", help="the class's keyword arguments as JSON")
    im.add_argument("--class", dest="model_class", metavar="NAME", help="the library's class (default: its main model)")
    im.add_argument("--input-shape", dest="input_shape", metavar="C,H,W",
                    help="image input shape for the convolutional classes (default: the file's x, else C,32,32)")

    ex = sub.add_parser("export", help="write a model file as ONNX, each layer in its compressed form, and check "
                                       "it with onnxruntime")
    ex.add_argument("model", metavar="MODEL.kanb",
                    help="a model file (bench run's models/, bench import, bench.compress)")
    ex.add_argument("--onnx", required=True, metavar="OUT.onnx", help="the ONNX file to write")
    ex.add_argument("--plugin", metavar="PATH", action="append", default=[],
                    help="a plugin file or folder defining a source the model uses (repeatable)")

    gc = sub.add_parser("gpucheck", help="the prepared GPU check: device tests, perf, quick and conv sweeps on CUDA "
                                         "into one folder (--device cpu --smoke: the same, small, here)")
    gc.add_argument("--out", required=True, metavar="DIR", help="a new folder for the results (at most 8 files)")
    gc.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    gc.add_argument("--smoke", action="store_true", help="every step small (a minute or two on 2 CPU cores)")
    gc.add_argument("--budget", type=float, default=480.0, help="wall-time budget in seconds (default 480)")
    gc.add_argument("--conv-epochs", dest="conv_epochs", type=int, default=15,
                    help="training epochs of the conv sweep's models (its CPU reference uses 5; default 15)")
    gc.add_argument("--conv-finetune-epochs", dest="conv_finetune_epochs", type=int, default=3,
                    help="fine-tune epochs of the conv sweep's control and methods (its CPU reference uses 1; "
                         "default 3)")
    gc.add_argument("--conv-patience", dest="conv_patience", type=int, default=None,
                    help="early-stopping patience of the conv sweep's training (its CPU reference uses 2 for 5 "
                         "epochs; default: a third of --conv-epochs, at least 2)")
    gc.add_argument("--data-dir", dest="data_dir", default="data", help="where Fashion-MNIST's files are")
    gc.add_argument("--work", metavar="DIR", help="where the sweeps' own folders go (default: a temporary folder)")

    ls = sub.add_parser("list", help="methods (with hyperparameters), datasets, bases, models, sweeps")
    ls.add_argument("--plugin", metavar="PATH", action="append", default=[], help="extra plugin file/folder")
    return p


def _probe(device: str, threads: int | None) -> dict:
    """The machine's speed now (:func:`bench.run.perf.speed_probe`) on the sweep's device and at the threads
    its runs pin (``[train] threads``; torch's own count is restored after); a probe that cannot run is
    recorded as such and never fails the call (an interrupt still stops it)."""
    import torch

    from bench.run.perf import speed_probe
    from bench.run.runner import resolve_device

    before = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(int(threads))
        return speed_probe(resolve_device(device))
    except Exception as exc:  # noqa: BLE001 - said in the record, the sweep goes on
        return {"error": f"{type(exc).__name__}: {str(exc)[:120]}", "threads": torch.get_num_threads(),
                "device": str(device)}
    finally:
        torch.set_num_threads(before)


def _sweep_threads(sweep) -> int | None:
    """The CPU threads the sweep's runs pin, when they all pin the same number (None: torch's own)."""
    pinned = {s.train.get("threads") for s in sweep.runs}
    return pinned.pop() if len(pinned) == 1 else None


def cmd_run(args) -> int:
    """Validate everything (plugins, names, options, budgets, data, executor flags, the output folder
    and its writer lock) before the first run starts; then run, print the runs that are not ok, log
    the call and write the leaderboard."""
    from bench.run.lock import results_writer
    from bench.run.runner import check_data, not_ok_lines, run_sweep
    from bench.run.sweep import build_sweep, read_sweep_file

    from .provenance import log_invocation
    from .registry import load_plugins
    from .report import report_folder

    load_plugins(args.plugin)
    data = read_sweep_file(args.config, args.sweep)
    overrides = {"datasets": args.datasets, "models": args.models, "bases": args.bases, "methods": args.methods,
                 "seeds": args.seeds, "device": args.device, "grid": args.grid, "epochs": args.epochs,
                 "finetune_epochs": args.finetune_epochs, "patience": args.patience, "base_model": args.base_model}
    sweep = build_sweep(data, overrides)
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    options = _executor_options(args)
    out = Path(args.out) if args.out else default_out(args, sweep.name)
    reference = None
    if args.against:
        from bench.run import against

        sweep, reference = against.prepare(sweep, args.against, out, log=print)
    if args.dry_run:  # no data, no GPU needed: it says what is missing and estimates on what is here
        return dry_run(sweep, out, data_dir, args.device or sweep.device)
    check_data(sweep, data_dir)
    if args.executor == "local":
        from bench.run.runner import resolve_device

        resolve_device(args.device or sweep.device)
    command = args.command_line
    with results_writer(out, command):
        device, threads = args.device or sweep.device, _sweep_threads(sweep)
        probe = {"start": _probe(device, threads)} if args.executor == "local" else {}
        t0 = time.perf_counter()
        try:
            if args.executor == "local":
                counts = run_sweep(sweep, out, data_dir, quiet=args.quiet, device=args.device)
            else:
                from bench.run.executors import run_with_executor

                counts = run_with_executor(args.executor, sweep, out, data_dir, quiet=args.quiet,
                                           device=args.device, options=options)
        except UserError:
            raise
        except BaseException as exc:  # an interrupted or crashed call is logged too, then re-raised
            log_invocation(out, command, time.perf_counter() - t0, {}, args.executor,
                           outcome="interrupted" if isinstance(exc, KeyboardInterrupt) else type(exc).__name__,
                           probe=probe)
            raise
        took = time.perf_counter() - t0
        if probe:
            try:
                probe["end"] = _probe(device, threads)
            except KeyboardInterrupt:  # the sweep has finished: its log line and report are still written
                probe["end"] = {"error": "interrupted", "device": str(device)}
        print(f"done in {took:.0f}s: {counts['ok']} ok, {counts['failed']} failed, {counts['diverged']} diverged, "
              + (f"{counts['infeasible']} infeasible, " if counts.get("infeasible") else "")
              + f"{counts['skipped_finished']} already finished "
              f"-> {out / 'runs.parquet'}")
        for line in not_ok_lines(sweep, out):
            print(line)
        log_invocation(out, command, took, counts, args.executor, probe=probe)
        if reference is not None:  # the re-run controls checked, the reference rows copied in
            from bench.run import against

            against.finish(args.against, reference, [s for s in sweep.runs if s.method in against.CHECKED], out)
        if not args.no_report:
            md = report_folder(out, out, command=command)
        print(f"results: {out}/ (runs.parquet, runs.csv, rows/)")
        print(f"leaderboard: {md} and {md.parent / 'index.html'}" if not args.no_report else
              f"leaderboard: not written (--no-report); write it with: python -m bench report {out}")
    if args.strict and (counts["failed"] or counts["diverged"]):
        return 1
    return 0


def dry_run(sweep, out: Path, data_dir: Path | None = None, device: str = "auto") -> int:
    """Print what ``bench run`` would do in ``out``: runs to do per dataset and method, the cached
    models it would train first (with their epochs), what is already finished, and the estimated
    wall time (:mod:`bench.run.estimate`). Trains nothing, downloads nothing; missing data is one line."""
    from collections import Counter

    import torch

    from bench.compression.pipeline import method_class
    from bench.run.estimate import estimate, report
    from bench.run.plan import plan_sweep, stage_epochs

    from .data import get_dataset

    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    missing = [name for name, opts in sweep.datasets.items()
               if not get_dataset(name, **opts).available(data_dir)]
    if missing:
        print(f"warning: data not in {data_dir} for {', '.join(missing)} (`bench run` would download it or "
              f"say where to place it); the dry run goes on without it")
    plan = plan_sweep(sweep, out)
    plan.announce("(dry run: nothing is trained)", print, quiet=False)
    for (dataset, method), n in sorted(Counter((r.dataset, r.method) for r in plan.runs).items()):
        print(f"  {dataset:16s} {method:12s} {n:4d} runs")
    epochs = Counter()
    for stage in plan.stages.values():
        method = method_class(stage.spec.method)(**stage.spec.method_config) if stage.own else None
        epochs[(stage.spec.dataset, stage.what, stage_epochs(stage.spec, method).epochs)] += 1
    print(f"models to train first: {len(plan.stages)}")
    for (dataset, what, n_epochs), n in sorted(epochs.items()):
        print(f"  {dataset:16s} {n:3d} x {what} ({n_epochs} epochs"
              + (", with its dense_ft control)" if what == "dense base model" else ")"))
    # timed where the runs would go: the GPU if the sweep may use one and there is one, else the CPU
    report(estimate(plan, data_dir, "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"))
    return 0


def default_out(args, sweep_name: str) -> Path:
    """``results/<sweep>`` for a sweep as its file says; with any of --datasets, --models, --bases,
    --methods, --seeds, --epochs, --finetune-epochs, --patience, --grid or --device given, a folder named after what
    was asked (``results/quick_digits_rbf_dense+quantize_epochs5``), so an ad-hoc run never lands in
    (and is never averaged with) the sweep's own results."""
    import hashlib
    import re

    parts = ["+".join(v) for v in (args.datasets, args.models, args.bases, args.methods) if v]
    if args.seeds:
        parts.append("seeds" + "+".join(map(str, args.seeds)))
    if args.epochs is not None:
        parts.append(f"epochs{args.epochs}")
    if args.finetune_epochs is not None:
        parts.append(f"ft{args.finetune_epochs}")
    if getattr(args, "patience", None) is not None:
        parts.append(f"patience{args.patience}")
    if args.grid:
        parts.append("grid")
    if args.device not in (None, "auto"):
        parts.append(args.device)
    if getattr(args, "base_model", None):
        parts.append("base-" + Path(args.base_model).stem.replace("{seed}", "S"))
    name = re.sub(r"[^A-Za-z0-9+.=_-]+", "-", "_".join([sweep_name, *parts]))
    if len(name) > 100:
        name = name[:80] + "-" + hashlib.sha1(name.encode()).hexdigest()[:10]
    return Path("results") / name


def _executor_options(args):
    """Check that executor flags match --executor (one line if not) and collect them."""
    from bench.run.executors import ExecutorOptions, require

    given = {"ray": [f for f in ("ray_address", "ray_num_cpus") if getattr(args, f) is not None],
             "slurm": [f for f in ("slurm_partition", "slurm_gpus", "slurm_time", "slurm_cpus")
                       if getattr(args, f) is not None] + (["slurm_local"] if args.slurm_local else [])}
    for executor, flags in given.items():
        if flags and args.executor != executor:
            names = ", ".join("--" + f.replace("_", "-") for f in flags)
            raise UserError(f"{names}: only valid with --executor {executor}")
    for f, least, strict in (("ray_num_cpus", 0, True), ("slurm_gpus", 0, False), ("slurm_time", 1, False),
                             ("slurm_cpus", 1, False)):
        value = getattr(args, f)
        if value is not None and (value <= least if strict else value < least):
            raise UserError(f"--{f.replace('_', '-')} {value:g} is out of range; it must be "
                            f"{'>' if strict else '>='} {least}")
    if args.executor != "local":
        require(args.executor)
    opts = ExecutorOptions(plugins=list(args.plugin), ray_address=args.ray_address,
                           slurm_partition=args.slurm_partition, slurm_gpus=args.slurm_gpus,
                           slurm_local=args.slurm_local)
    for f in ("ray_num_cpus", "slurm_time", "slurm_cpus"):
        if getattr(args, f) is not None:
            setattr(opts, f, getattr(args, f))
    return opts


def cmd_merge(args) -> int:
    from bench.run.merge import merge_results

    from .registry import load_plugins
    from .report import report_folder

    load_plugins(args.plugin)
    out = Path(args.out)
    n = merge_results(args.folders, out)
    print(f"merged {n['folders']} folders: {n['rows']} runs ({n['duplicates']} duplicate rows dropped) "
          f"-> {out / 'runs.parquet'}")
    if args.report:
        md = report_folder(out, out, command=args.command_line)
        print(f"leaderboard: {md}")
    return 0


def cmd_report(args) -> int:
    import math

    from bench.run.lock import writable_folder

    from .report import report_folder

    for flag, value in (("--tolerance", args.tolerance), ("--rmse-tolerance", args.rmse_tolerance)):
        if not math.isfinite(value) or value < 0:
            raise UserError(f"{flag} {value:g} is out of range; it must be a number >= 0")
    results = Path(args.results)
    if not results.exists():
        raise UserError(f"results folder {args.results!r} not found")
    out = Path(args.out) if args.out else (results if results.is_dir() else results.parent)
    writable_folder(out, "report folder")
    md = report_folder(results, out, tolerance_acc=args.tolerance, tolerance_rmse_rel=args.rmse_tolerance,
                       title=args.title, rendered_by=args.command_line)
    print(f"leaderboard: {md}")
    return 0


def cmd_perf(args) -> int:
    from bench.run.perf import main as perf_main

    if args.batch < 1 or args.repeats < 1 or len(args.widths) < 2 or min(args.widths) < 1:
        raise UserError("perf needs --batch >= 1, --repeats >= 1 and --widths of at least two positive sizes")
    if args.conv_batch < 1 or (args.conv_channels and min(args.conv_channels) < 1):
        raise UserError("perf needs --conv-batch >= 1 and positive --conv-channels")
    return perf_main(args)


def cmd_transfer(args) -> int:
    from bench.run.transfer import parse_ranks, parse_targets, run_transfer

    from .report import report_folder

    ranks, targets = parse_ranks(args.ranks), parse_targets(args.targets)
    out = Path(args.out)
    t0 = time.perf_counter()
    rows = run_transfer(out, ranks, targets, pretrain_epochs=args.pretrain_epochs,
                        finetune_epochs=args.finetune_epochs, seeds=args.seeds, lr_rule=args.lr_rule,
                        progress=not args.quiet)
    ok = sum(r.get("status") == "ok" for r in rows)
    print(f"done in {time.perf_counter() - t0:.0f}s: {ok} ok, {len(rows) - ok} not ok -> {out / 'transfer.csv'}")
    if not args.no_report:
        md = report_folder(out, out, command=args.command_line)
        print(f"leaderboard: {md}")
    return 0


IMPORT_TOLERANCE = 1e-5  # float32 max |error| against the library's recorded outputs (relative to max(1, |y|))


def cmd_export(args) -> int:
    import torch

    from bench.compression.storage import load_model
    from bench.deploy import check_onnx, export_onnx
    from bench.deploy.onnx_export import input_shape

    from .registry import load_plugins

    src, out = Path(args.model), Path(args.onnx)
    if not src.is_file():
        raise UserError(f"{src}: no such model file")
    if out.is_dir():
        raise UserError(f"--onnx {out} is a folder; give the ONNX file's path (OUT.onnx)")
    load_plugins(args.plugin)
    try:
        model = load_model(src)
    except ValueError as exc:  # not a model file, or a damaged one
        raise UserError(str(exc)) from None
    export = export_onnx(model, out)
    x = 2 * torch.randn(64, *input_shape(model)[1:], generator=torch.Generator().manual_seed(0))
    diff = check_onnx(model, out, x)
    print(f"wrote {out}: {export.bytes:,} bytes (model file {src.stat().st_size:,} bytes; counted "
          f"{export.counted_bytes:,.0f} bytes)")
    for where, form in export.forms.items():
        print(f"  {where}: {form}")
    for note in export.notes:
        print(f"  note: {note}")
    print(f"onnxruntime against PyTorch on 64 random inputs: max |difference| {diff:.1e} of the output scale")
    return 0


def cmd_import(args) -> int:
    import json

    from bench.compression.storage import export_model, load_model, storage_report
    from bench.interop import check_outputs, import_model, read_import_file
    from bench.model.kinds import arch_string

    try:
        constructor = json.loads(args.constructor) if args.constructor else None
    except json.JSONDecodeError as exc:
        raise UserError(f"--constructor is not JSON: {exc}") from None
    if constructor is not None and not isinstance(constructor, dict):
        raise UserError("--constructor must be a JSON object of keyword arguments")
    shape = None
    if args.input_shape:
        try:
            shape = tuple(int(v) for v in _csv(args.input_shape))
        except ValueError:
            shape = ()
        if len(shape) != 3 or min(shape) < 1:
            raise UserError(f"--input-shape must be C,H,W (three positive integers), got {args.input_shape!r}")
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give the model file's path (MODEL.kanb)")
    src = read_import_file(args.file, args.library, constructor, args.model_class)
    x = src.get("x")
    if shape is None and x is not None and x.dim() == 4:
        shape = tuple(x.shape[1:])
    model = import_model(src["state_dict"], src["library"], src["constructor"], src["model_class"], input_shape=shape)
    tmp = out.with_name(out.name + ".partial")
    export_model(model, tmp)
    reloaded = load_model(tmp)
    err = None
    if x is not None and src.get("y") is not None:
        err = check_outputs(reloaded, x, src["y"])
        tol = IMPORT_TOLERANCE * max(1.0, float(src["y"].abs().max()))
        if not err <= tol:
            tmp.unlink()
            raise UserError(f"the imported model differs from the file's y by {err:.3g} (> {tol:.1g}): the "
                            "constructor or class does not match the weights; nothing written")
    tmp.replace(out)
    info = model.imported_from
    bits = storage_report(reloaded).stored_bits
    print(f"imported {info['library']} {info['class']} -> {out} ({out.stat().st_size:,} bytes, {bits:,} counted "
          f"bits; {arch_string(reloaded)}, basis {reloaded.config()['basis']})")
    if err is not None:
        print(f"max |error| against the file's y: {err:.2e} (float32, the reloaded model)")
    else:
        print("the file has no x/y to check against: compare the outputs yourself (bench.interop.check_outputs)")
    return 0


def cmd_gpucheck(args) -> int:
    from bench.run.gpucheck import main as gpucheck_main

    return gpucheck_main(args)


def cmd_list(args) -> int:
    from bench.compression.methods import METHODS
    from bench.model.bases import BASES
    from bench.model.kinds import MODELS
    from bench.run.sweep import bundled_sweeps, read_sweep_file

    from .config import describe
    from .data import DATASETS
    from .registry import load_plugins

    load_plugins(args.plugin)
    print("methods:")
    for name in sorted(METHODS):
        cls = METHODS[name]
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"  {name:14s} {doc}")
        for opt, tp, default, help_ in describe(cls.Config):
            grid = f"  grid: {cls.grid[opt]}" if opt in cls.grid else ""
            print(f"      {opt} ({tp}) = {default!r}{'  ' + help_ if help_ else ''}{grid}")
    from bench.compression.pipeline import SYNTAX

    print(f"  {SYNTAX}")
    print("datasets:")
    for name in sorted(DATASETS):
        cls = DATASETS[name]
        shape = "x".join(map(str, cls.input_shape))
        print(f"  {name:18s} {cls.task:14s} input {shape:9s} {cls.description}")
    print("bases:")
    import inspect

    for name, cls in BASES.items():
        sig = inspect.signature(cls.__init__)
        opts = ", ".join(f"{k}={v.default!r}" for k, v in sig.parameters.items() if k not in ("self", "in_features"))
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"  {name:10s} {opts}\n      {doc}")
    print("models:")
    for name, kind in MODELS.items():
        opts = ", ".join(f"{o}={d!r}" for o, _, d, _ in describe(kind.Options))
        doc = (kind.__doc__ or "").strip().splitlines()[0]
        print(f"  {name:10s} {opts}\n      {doc}")
    print("sweeps:")
    for name, path in bundled_sweeps().items():
        desc = read_sweep_file(path).get("description", "")
        print(f"  {name:10s} {desc}")
    return 0


def main(argv: list[str] | None = None, command: str | None = None) -> int:
    """``python -m bench ARGV``; ``command`` is what reports and logs record as the invocation (default:
    ``python -m bench`` and the arguments), for a script that calls this function."""
    try:
        args = build_parser().parse_args(argv)
        args.command_line = command or "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv)
        if args.command is None:
            build_parser().print_help()
            return 2
        return {"run": cmd_run, "report": cmd_report, "list": cmd_list, "merge": cmd_merge,
                "perf": cmd_perf, "transfer": cmd_transfer, "import": cmd_import, "export": cmd_export,
                "gpucheck": cmd_gpucheck}[args.command](args)
    except UserError as exc:
        msg = " ".join(str(exc).split())
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished runs are saved, rerun the same command to resume", file=sys.stderr)
        return 130
