"""Wall-time estimate of a plan (``bench run --dry-run``), from FLOPs and a short timing probe.

Nothing is trained and no data is read. For every distinct model setup of the plan (dataset input
shape, model kind and options, basis and options, batch size, ``compile``, ``amp``) the model is
built on synthetic inputs of the dataset's shape and

- the FLOPs of one training step (forward, backward; :class:`torch.utils.flop_counter.FlopCounterMode`)
  are counted per sample;
- a few real training steps (AdamW) are timed on this machine, on a probe batch small enough to keep
  the step short (the paper's 8-layer ConvKAN on CPU gets a batch of one or two), and the step time
  is scaled to seconds per sample (the fastest timed step counts: the least disturbed by other work).
  The whole probe is bounded (:data:`PROBE_BUDGET_S`): first one setup per (model kind, basis), the
  smallest first, then the others while time is left; setups left unprobed take the FLOP rate of a
  probed setup of the same model and basis (else the same model kind).

The samples each setup processes come from the plan: every stage trains ``stage_epochs`` epochs
(the dense base also its ``dense_ft`` control, ``finetune_epochs``), every run fine-tunes as its
method says (:meth:`bench.compression.methods.Method.finetune_epochs`) and is scored on validation and test;
each epoch of training is scored on validation too (a forward pass, a third of a step). Split sizes
come from :meth:`bench.data.Dataset.split_sizes` (loaded only if a dataset cannot say).
Patience may stop training early, so the estimate is an upper bound of the work asked for.

Step times at a tiny probe batch overstate the per-sample cost of a big batch on CPU; on a GPU
without a probe the estimate is FLOPs at an assumed sustained throughput (:data:`ASSUMED_GPU_FLOPS`),
but never less than the launch-bound step times measured on a GPU (:data:`GPU_STEP_S_PER_KAN_LAYER`,
:data:`GPU_STEP_S_PER_KAN_CONV`: small KAN steps wait on kernel launches, not arithmetic).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from bench.compression.pipeline import method_class
from bench.data import get_dataset
from bench.model.bases import eager_features
from bench.model.kan import KANConv2d, kan_layers

from .plan import Plan, stage_epochs
from .train import adamw, eval_batch_size

PROBE_BUDGET_S = 15.0  # the whole timing probe, all setups together
PROBE_STEP_FLOPS_CPU = 2e9  # the probe batch on CPU holds about this many training-step FLOPs
PROBE_WARMUP = 2  # untimed steps first (the first steps of a model are several times slower)
PROBE_STEPS = 4  # timed steps per setup (the fastest counts)
ASSUMED_GPU_FLOPS = 100e12  # H100-class, bf16, sustained: an assumption, not a measurement
# A KAN's training step on a GPU is bound by kernel launches at the sizes of these sweeps. Measured on one
# H200 (reports/gpu/perf.csv: `bench perf --device cuda`, alone, five bases): kan [784, 64, 10], two KAN
# layers, 2.25-2.84 ms a step at batch 256; convkan [16, 32, 64], three KAN convolutions and a KAN head,
# 7.2-8.7 ms at batch 64; inference 0.22-0.35 of a step. The floors below are the slowest basis's, per
# layer, so a deeper model's floor grows with its layers; a wider one may run above them (FLOPs). Not
# counted: a meta-learner's or Tucker factors' extra launches (MetaKAN, Slim-KAN).
GPU_STEP_S_PER_KAN_LAYER = 1.45e-3  # a fully connected KAN layer's share of a training step (rbf: 2.84 / 2)
GPU_STEP_S_PER_KAN_CONV = 2.5e-3  # a KAN convolution's: (8.68 - 1.45) / 3 ms, rounded up (fourier)
GPU_EVAL_SHARE = 0.35  # an evaluation batch against a training step (the largest measured share)
FORWARD_SHARE = 1 / 3  # an evaluation sample costs about a third of a training sample


@dataclass
class Setup:
    """One distinct trained model setup and the work the plan asks of it."""

    label: str
    spec: object  # the first RunSpec with this setup
    train_samples: float = 0.0  # samples through a training step
    eval_samples: float = 0.0  # samples through a forward pass only
    steps: float = 0.0  # optimiser steps
    eval_batches: float = 0.0  # forward passes of the evaluations
    gpu_step_floor_s: float = 0.0  # launch-bound time of one training step on a GPU (measured per layer)
    flops_per_sample: float = 0.0  # one training step, per sample
    seconds_per_sample: float | None = None  # measured on this machine
    probe_batch: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def flops(self) -> float:
        return self.flops_per_sample * (self.train_samples + FORWARD_SHARE * self.eval_samples)

    def seconds(self) -> float:
        return (self.seconds_per_sample or 0.0) * (self.train_samples + FORWARD_SHARE * self.eval_samples)

    def gpu_seconds(self) -> float:
        """On one GPU: the FLOPs at :data:`ASSUMED_GPU_FLOPS`, or the launch-bound floor if that is longer."""
        floor = self.gpu_step_floor_s * (self.steps + GPU_EVAL_SHARE * self.eval_batches)
        return max(self.flops / ASSUMED_GPU_FLOPS, floor)


def setup_key(spec) -> str:
    t = spec.train
    return json.dumps([spec.dataset, spec.dataset_options, spec.model, spec.model_options, spec.basis,
                       spec.basis_options, t.get("batch_size"), t.get("compile") is not False,
                       bool(t.get("amp", False))], sort_keys=True, default=str)


def split_sizes(spec, data_dir) -> tuple[int, int, int]:
    """(train, val, test) sizes of the spec's dataset: stated by the dataset, else loaded."""
    ds = get_dataset(spec.dataset, **spec.dataset_options)
    sizes = ds.split_sizes()
    if sizes is None:
        s = ds.load(data_dir, spec.seed)
        sizes = (len(s.y_train), len(s.y_val), len(s.y_test))
    return tuple(int(n) for n in sizes)


def plan_work(plan: Plan, data_dir) -> dict[str, Setup]:
    """The samples every setup of ``plan`` trains and evaluates (no model is built)."""
    setups: dict[str, Setup] = {}
    sizes: dict[str, tuple[int, int, int]] = {}

    def setup_of(spec) -> tuple[Setup, tuple[int, int, int]]:
        key = setup_key(spec)
        if key not in setups:
            t = spec.train
            setups[key] = Setup(f"{spec.dataset}/{spec.model}/{spec.basis} batch {t.get('batch_size')}"
                                + (" compile" if t.get("compile") else "") + (" amp" if t.get("amp") else ""), spec)
        dkey = json.dumps([spec.dataset, spec.dataset_options], sort_keys=True, default=str)
        if dkey not in sizes:
            sizes[dkey] = split_sizes(spec, data_dir)
        return setups[key], sizes[dkey]

    def add_evals(s: Setup, sizes, batch: int) -> None:
        """One evaluation of each split size in ``sizes``."""
        s.eval_samples += sum(sizes)
        s.eval_batches += sum(math.ceil(k / eval_batch_size(batch)) for k in sizes)

    def add_fit(s: Setup, n: tuple[int, int, int], epochs: int, batch: int) -> None:
        s.train_samples += epochs * n[0]
        s.steps += epochs * math.ceil(n[0] / batch)
        add_evals(s, [n[1]] * (epochs + 1), batch)  # validation after every epoch and before the first

    for stage in plan.stages.values():
        s, n = setup_of(stage.spec)
        batch = int(stage.spec.train["batch_size"])
        if stage.own:
            method = method_class(stage.spec.method)(**stage.spec.method_config)
            add_fit(s, n, stage_epochs(stage.spec, method).epochs, batch)
        else:
            add_fit(s, n, stage_epochs(stage.spec).epochs, batch)
            add_fit(s, n, int(stage.spec.train.get("finetune_epochs", 0)), batch)  # the dense_ft control
            add_evals(s, (n[2], n[1], n[2]), batch)  # the base's test score, the control's validation and test
    for spec in plan.runs:
        s, n = setup_of(spec)
        method = method_class(spec.method)(**spec.method_config)
        batch = int(spec.train["batch_size"])
        epochs = method.finetune_epochs(int(spec.train.get("finetune_epochs", 0)))
        if epochs > 0:  # a method that does not fine-tune (dense, the control's row, round to nearest) fits nothing
            add_fit(s, n, epochs, batch)
        add_evals(s, (n[1], n[2]), batch)  # the run's validation and test scores
        recal = int(spec.train.get("bn_recalibration") or 0)
        if recal and not getattr(method, "is_control", False) and not getattr(method, "untouched", False):
            add_evals(s, (n[1],), batch)  # BatchNorm re-estimated: a validation score first, then its forwards
            s.eval_samples += recal * batch
            s.eval_batches += recal
    return setups


def gpu_step_floor(spec) -> float:
    """The launch-bound seconds of one training step of ``spec``'s model on a GPU: the measured time per
    KAN layer and per KAN convolution (:data:`GPU_STEP_S_PER_KAN_LAYER`), summed over the model's."""
    _, model = build_probe_model(spec, "meta")
    convs = sum(isinstance(m, KANConv2d) for m in model.modules())
    return convs * GPU_STEP_S_PER_KAN_CONV + (len(kan_layers(model)) - convs) * GPU_STEP_S_PER_KAN_LAYER


def _inputs(ds, batch: int, device):
    x = torch.randn(batch, *ds.input_shape, device=device)
    if ds.task == "classification":
        return x, torch.randint(0, ds.n_outputs, (batch,), device=device)
    return x, torch.randn(batch, ds.n_outputs, device=device)


def _step(model, opt, x, y, task, amp: bool, device) -> None:
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
        out = model(x).float()
    loss = F.cross_entropy(out, y) if task == "classification" else F.mse_loss(out, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def build_probe_model(spec, device):
    from bench.model.kinds import build, model_options

    ds = get_dataset(spec.dataset, **spec.dataset_options)
    with torch.device(device):  # built where it runs (on "meta" nothing is allocated)
        model = build(spec.model, model_options(spec.model, spec.model_options), ds, spec.basis, spec.basis_options)
    return ds, model.to(device).train()


def step_flops(spec, batch: int = 1, device=None) -> float:
    """FLOPs of one training step (forward and backward) of the spec's model, per sample, as
    :class:`~torch.utils.flop_counter.FlopCounterMode` counts them: matrix products and convolutions
    (the basis evaluation's elementwise work is not counted). On the meta device by default (shapes
    only, nothing computed), on the CPU if a model cannot run there."""
    from torch.utils.flop_counter import FlopCounterMode

    if device is None:
        try:
            return step_flops(spec, batch, "meta")
        except Exception:  # an op without a meta kernel: count on the CPU
            return step_flops(spec, batch, "cpu")
    device = torch.device(device)
    ds, model = build_probe_model(spec, device)
    x, y = _inputs(ds, batch, device)
    with FlopCounterMode(display=False) as counter, eager_features():
        out = model(x)
        loss = F.cross_entropy(out, y) if ds.task == "classification" else F.mse_loss(out, y)
        loss.backward()
    return counter.get_total_flops() / batch


def probe(s: Setup, device, deadline: float) -> None:
    """Count the FLOPs of ``s``'s training step and time a few steps (until ``deadline``)."""
    torch.manual_seed(0)
    batch = int(s.spec.train["batch_size"])
    if device.type == "cpu":
        batch = max(1, min(batch, int(PROBE_STEP_FLOPS_CPU // max(s.flops_per_sample, 1.0))))
    ds, model = build_probe_model(s.spec, device)
    opt = adamw([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x, y = _inputs(ds, batch, device)
    amp = bool(s.spec.train.get("amp", False))
    threads = torch.get_num_threads()
    if device.type == "cpu":  # the threads a run pins (bench.run.runner)
        torch.set_num_threads(int(s.spec.train.get("threads", threads)))
    times = []
    with eager_features():
        try:
            for i in range(PROBE_WARMUP + PROBE_STEPS):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                _step(model, opt, x, y, ds.task, amp, device)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i >= PROBE_WARMUP:
                    times.append(time.perf_counter() - t0)
                if time.perf_counter() >= deadline:
                    break
        finally:
            torch.set_num_threads(threads)
    if not times:  # out of time during warm-up: the last (slower) warm-up step
        times = [time.perf_counter() - t0]
        s.notes.append("timed a warm-up step only")
    s.probe_batch = batch
    s.seconds_per_sample = min(times) / batch  # the fastest step: the least disturbed by other work
    if s.spec.train.get("compile") is not False:
        s.notes.append("timed eager (the run compiles its features: faster)")


def human(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def estimate(plan: Plan, data_dir, device: str = "cpu", budget_s: float = PROBE_BUDGET_S) -> dict:
    """The work of ``plan`` per setup, probed on ``device``; returns totals (see :func:`report`)."""
    dev = torch.device(device)
    setups = list(plan_work(plan, data_dir).values())
    for s in setups:
        s.flops_per_sample = step_flops(s.spec)
        s.gpu_step_floor_s = gpu_step_floor(s.spec)
    setups.sort(key=lambda s: -s.flops)  # the biggest first
    threads = torch.get_num_threads()
    deadline = time.perf_counter() + budget_s
    # first one probe per (model kind, basis), the biggest setup of each
    groups: dict[tuple, Setup] = {}
    for s in setups:
        groups.setdefault((s.spec.model, s.spec.basis), s)
    reps = sorted(groups.values(), key=lambda s: s.flops_per_sample)  # quick probes first, big ones share the rest
    rest = sorted((s for s in setups if s not in reps), key=lambda s: s.flops_per_sample)
    for i, s in enumerate(reps):
        now = time.perf_counter()
        if now < deadline:  # each probe gets its share of what is left
            probe(s, dev, now + (deadline - now) / (len(reps) - i))
    for i, s in enumerate(rest):  # then, with what time is left, the others too
        now = time.perf_counter()
        if now < deadline:
            probe(s, dev, now + (deadline - now) / (len(rest) - i))
    timed = [s for s in setups if s.seconds_per_sample is not None]

    def rate(group: list[Setup]) -> float | None:
        group = [s for s in group if s.seconds_per_sample]
        return sum(s.flops_per_sample for s in group) / sum(s.seconds_per_sample for s in group) if group else None

    for s in setups:
        if s.seconds_per_sample is not None:
            continue
        same = [t for t in timed if (t.spec.model, t.spec.basis) == (s.spec.model, s.spec.basis)]
        kind = [t for t in timed if t.spec.model == s.spec.model]
        for group, how in ((same, "the FLOP rate of " + (same[0].label if same else "")),
                           (kind, f"the {s.spec.model} FLOP rate"), (timed, "the probed FLOP rate")):
            r = rate(group)
            if r:
                s.seconds_per_sample = s.flops_per_sample / r
                s.notes.append("at " + how)
                break
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    return {"setups": setups, "flops": sum(s.flops for s in setups),
            "seconds": sum(s.seconds() for s in setups), "device": name, "threads": threads,
            "device_type": dev.type,
            "gpu_assumed_seconds": sum(s.gpu_seconds() for s in setups)}


def report(est: dict, log=print) -> None:
    """The dry run's estimate lines."""
    setups = est["setups"]
    if not setups:
        log("estimated wall time: nothing to train or run")
        return
    log(f"estimated work: {est['flops']:.3g} FLOPs over {len(setups)} model setups "
        f"(training steps + evaluations; an upper bound if patience stops early)")
    for s in setups:
        per = f"{s.seconds_per_sample * 1e3:.3g} ms/sample" if s.seconds_per_sample else "no timing"
        log(f"  {s.label:44s} {s.train_samples:11.3g} train samples {s.flops_per_sample:9.3g} FLOPs/sample "
            f"{per}" + (f" (probe batch {s.probe_batch})" if s.probe_batch else "") + f" -> {human(s.seconds())}"
            + (f"  [{'; '.join(s.notes)}]" if s.notes else ""))
    where = (f"{est['device']}" if est["device_type"] == "cuda"
             else f"this machine ({est['device']}, {est['threads']} threads)")
    load = ""
    if est["device_type"] != "cuda" and hasattr(os, "getloadavg") and os.getloadavg()[0] >= 1.0:
        load = f"; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: other work slows the probe"
    log(f"estimated wall time on {where}: {human(est['seconds'])} "
        f"(measured step times, scaled by samples{load})")
    if est["device_type"] != "cuda":
        log(f"estimated wall time on one GPU: {human(est['gpu_assumed_seconds'])}: the FLOPs at an assumed "
            f"{ASSUMED_GPU_FLOPS / 1e12:.0f} TFLOP/s sustained (H100-class, bf16), but no faster than the "
            f"launch-bound steps measured on an H200 ({GPU_STEP_S_PER_KAN_LAYER * 1e3:.2f} ms a step per KAN "
            f"layer, {GPU_STEP_S_PER_KAN_CONV * 1e3:.2f} ms per KAN convolution; reports/gpu); not measured here "
            "(no CUDA)")

