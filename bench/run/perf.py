"""``python -m bench perf``: how fast KAN layers train and compressed KANs infer, as ratios.

Everything is measured in one process, with warm-up and the median over repeats, the subject
and its reference timed alternately, and reported as a ratio to that reference (machines here
are shared and noisy; ratios travel, milliseconds do not):

- **train step** (forward + backward + AdamW step) and **inference** of ``kan [784, 64, 10]``
  per basis at batch 256, against an MLP ``784 -> H -> 10`` whose H matches the KAN's
  parameter count (ratio KAN / MLP);
- **peak memory of a training step** per basis against the MLP: CUDA ``max_memory_allocated``
  on GPU; on CPU the bytes the step holds (parameters, gradients, AdamW state and every tensor
  autograd saves for backward), plus the largest saved tensor relative to ``[B, in, n_basis]``
  of the widest layer;
- **compressed inference**: each compressed form made by the real method (``kmeans`` K=16
  codebook, ``quantize`` 8-bit and 4-bit, ``prune`` at 8x, ``tucker`` at its default) against the
  dense model it came from (ratio compressed / dense, below 1 is faster);
- **compressed run time** (codebook and quantised): the deployed form (:func:`bench.deploy.compact`:
  integer codes, a narrow index, the codebook's gather path) against the dense model at batch 1
  and at the batch size, and the bytes it holds at run time over its counted bytes (the form as the
  harness evaluates it, with its decompressed cache, for reference);
- **ConvKAN** (``--conv-channels``, default ``16,32,64`` on 1x28x28 inputs, BatchNorm, 2x2
  max-pooling after each layer) per basis at ``--conv-batch``: train step and inference against a
  CNN of the same layout (3x3 ``Conv2d`` + BatchNorm + ReLU + max-pool per layer, average pool,
  linear head) whose widths are scaled to the ConvKAN's parameter count (target train step <= 1.2x),
  and the fast per-pixel KAN convolution against its unfold reference (``forward_unfold``).

- **anchors** (``--anchors``): the public fast KAN layers ``flashkan`` and ``inkan`` (pip extra
  ``anchors``; skipped with a reason when absent) against the same MLP, and the project's default
  bspline KAN against each of them directly.

The KAN layers run their default path: compiled basis features wherever a compiler works
(:func:`bench.model.bases.fused_features`; the header line says which). Targets are printed next to
each ratio.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from bench.data import Splits
from bench.errors import UserError
from bench.model.kan import KAN, kan_layers

from .train import Trainer, adamw, recorder, step_bytes

NOISE = 0.02  # repeat-to-repeat spread of the alternating timer here: a ratio within 2 % of its target meets it
# Targets (issue "KAN layers as fast as an MLP"): KAN / same-parameter MLP on the default path
TRAIN_TARGETS = {"bspline": 1.3, "rbf": 1.8, "chebyshev": 1.3, "gram": 1.3, "fourier": 1.3}
INFER_TARGETS = {"bspline": 1.4, "rbf": 1.8, "chebyshev": 1.4, "gram": 1.4, "fourier": 1.4}
CONV_TRAIN_TARGET = 1.2  # ConvKAN train step / same-parameter CNN
COMPRESSED = {  # name -> (method, hyperparameters, target ratio compressed/dense inference or None)
    "codebook K=16": ("kmeans", {"K": 16, "n_init": 1}, 1.0),
    "quantised 8-bit": ("quantize", {"bits": 8, "calibrate": False}, None),
    "quantised 4-bit": ("quantize", {"bits": 4, "calibrate": False}, None),
    "pruned 8x": ("prune", {"ratio": 8.0}, 1 / 8),
    "tucker default": ("tucker", {}, None),
}


# Public fast KAN layers timed beside the project's (``--anchors``): module, class, how to build one
# for ``widths`` (their defaults: cubic B-splines on 5 intervals, SiLU base branch, torch.compile'd
# basis, as the project's default bspline), and the pip name that installs it (extra ``anchors``).
ANCHORS = {
    "flashkan": ("flashkan", "KANNetwork", lambda cls, widths: cls(list(widths))),
    "inkan": ("inkan", "KANNetwork", lambda cls, widths: cls(list(widths))),
}


def load_anchor(name: str):
    """``(version, builder)`` of an anchor library, or ``(None, reason)`` when it cannot be imported."""
    import importlib

    module, cls_name, build = ANCHORS[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        return None, f"not installed ({exc.__class__.__name__}: {exc}; pip install -e '.[anchors]')"
    cls = getattr(mod, cls_name, None)
    if cls is None:
        return None, f"{module} has no {cls_name}"
    return getattr(mod, "__version__", "?"), lambda widths: build(cls, widths)


@dataclass
class Timer:
    device: torch.device
    warmup: int = 3
    repeats: int = 20

    def __call__(self, fn) -> float:
        """Median seconds of ``fn()`` over the repeats."""
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeats):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def compare(self, fn, ref) -> tuple[float, float]:
        """Median seconds of ``fn`` and of ``ref``, timed alternately (A, B, A, B, ...) so that
        drifting machine load hits both alike; the ratio of the two is what is reported."""
        for _ in range(self.warmup):
            fn()
            ref()
        a, b = [], []
        for _ in range(self.repeats):
            for f, store in ((fn, a), (ref, b)):
                self.sync()
                t0 = time.perf_counter()
                f()
                self.sync()
                store.append(time.perf_counter() - t0)
        return statistics.median(a), statistics.median(b)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def matched_mlp(widths: list[int], n_params: int) -> nn.Module:
    """``in -> H -> out`` MLP with H chosen so its parameter count is closest to ``n_params``."""
    i, o = widths[0], widths[-1]
    h = max(1, round((n_params - o) / (i + 1 + o)))
    return nn.Sequential(nn.Linear(i, h), nn.ReLU(), nn.Linear(h, o))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def layout_cnn(in_channels: int, channels: list[int], n_outputs: int) -> nn.Module:
    """The ConvKAN's layout as a CNN: per layer a 3x3 conv, BatchNorm, ReLU and 2x2 max-pool."""
    blocks, c_in = [], in_channels
    for c in channels:
        blocks += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
        c_in = c
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, n_outputs))


def matched_cnn(in_channels: int, channels: list[int], n_outputs: int, target: int) -> nn.Module:
    """:func:`layout_cnn` with every width scaled by one factor, the one whose parameter count is
    closest to ``target``."""
    best = None
    for step in range(1, 400):
        scale = step / 20
        widths = [max(1, round(c * scale)) for c in channels]
        cnn = layout_cnn(in_channels, widths, n_outputs)
        if best is None or abs(n_params(cnn) - target) < abs(n_params(best) - target):
            best = cnn
        if n_params(cnn) > target:
            break
    return best


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = adamw(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step, opt


def step_memory(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> tuple[int, int]:
    """(bytes one training step holds, bytes of its largest saved tensor)."""
    step, opt = train_step(model, x, y)
    step()  # create the optimiser state
    saved: list[torch.Tensor] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with torch.autograd.graph.saved_tensors_hooks(recorder(saved), lambda t: t):
        loss = F.cross_entropy(model(x), y)
    largest = max((t.numel() * t.element_size() for t in saved), default=0)
    if device.type == "cuda":
        loss.backward()
        opt.step()
        return int(torch.cuda.max_memory_allocated(device)), largest
    loss.backward()
    total = step_bytes(saved, opt)
    opt.step()
    return int(total), largest


def _compress(dense: nn.Module, method: str, hyper: dict, x: torch.Tensor, y: torch.Tensor, device) -> nn.Module:
    from bench.compression.methods import CompressContext, get_method_class

    model = copy.deepcopy(dense)
    n = x.shape[0]
    splits = Splits(x, y, x[: n // 2], y[: n // 2], x[n // 2:], y[n // 2:])
    trainer = Trainer(splits, "classification", device, batch_size=n)
    get_method_class(method)(**hyper).compress(model, CompressContext(trainer, 0, 0, device))
    return model.eval()


def speed_probe(device: str | torch.device = "cpu", repeats: int = 20) -> dict:
    """How fast this machine is now, by one fixed workload (:data:`bench.provenance.PROBE_WORKLOAD`: median
    milliseconds of each, timed alternately after warm-up; about a second once the features are compiled)
    at torch's current threads and features path (both recorded). ``bench run`` records it at the start and
    the end of every local sweep call (``invocations.jsonl``; not counted in its wall time) and the
    leaderboard's header prints it, so that wall times from different machines, or from one machine on a
    slow day, can be compared.
    The random state of every device is left as it was."""
    from bench.model.bases import features_path

    dev = torch.device(device)
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(0)
        x = torch.randn(128, 784, device=dev)
        y = torch.randint(0, 10, (128,), device=dev)
        kan = KAN([784, 64, 10]).to(dev)
        mlp = matched_mlp([784, 64, 10], n_params(kan)).to(dev)
        t_kan, t_mlp = Timer(dev, warmup=5, repeats=repeats).compare(train_step(kan, x, y)[0],
                                                                      train_step(mlp, x, y)[0])
    return {"kan_ms": round(t_kan * 1e3, 2), "mlp_ms": round(t_mlp * 1e3, 2), "threads": torch.get_num_threads(),
            "device": dev.type, "features": features_path()}


def run_perf(device: str = "auto", batch: int = 256, widths=(784, 64, 10), bases=None, repeats: int = 20,
             compressed: bool = True, log=print, conv_channels=(16, 32, 64), conv_batch: int = 64, fused: bool = False,
             conv_shape=(1, 28, 28), anchors: bool = False) -> pd.DataFrame:
    from bench.model.bases import BASES
    from bench.registry import load_plugins

    from .runner import resolve_device

    dev = resolve_device(device)
    bases = list(bases or ["bspline", "rbf", "chebyshev", "gram", "fourier"])
    for b in bases:
        if b not in BASES:
            raise UserError(f"unknown basis {b!r}; valid: {', '.join(sorted(BASES))}")
    timer = Timer(dev, repeats=repeats)
    torch.manual_seed(0)
    widths = list(widths)
    x = torch.randn(batch, widths[0], device=dev)
    y = torch.randint(0, widths[-1], (batch,), device=dev)
    rows = []

    def add(kind, basis, subject, value, reference, target=None, unit="ms"):
        ratio = value / reference if reference else float("nan")
        rows.append({"kind": kind, "basis": basis, "subject": subject, "value": value, "reference": reference,
                     "unit": unit, "ratio": ratio, "target": target,
                     "meets_target": None if target is None else bool(ratio <= target * (1 + NOISE))})

    kan0 = KAN(widths, bases[0])
    mlp = matched_mlp(widths, n_params(kan0)).to(dev)
    mlp_step, _ = train_step(mlp, x, y)
    with torch.no_grad():
        mlp_infer = timer(lambda: mlp(x))
    mlp_train = timer(mlp_step)
    mlp_mem, _ = step_memory(mlp, x, y, dev)
    mlp.eval()
    log(f"MLP {widths[0]}->{mlp[0].out_features}->{widths[-1]}: {n_params(mlp):,} params "
        f"(KAN: {n_params(kan0):,}); train step {mlp_train * 1e3:.2f} ms, inference {mlp_infer * 1e3:.2f} ms")
    load_plugins()
    for basis in bases:
        torch.manual_seed(0)
        kan = KAN(widths, basis).to(dev)
        step, _ = train_step(kan, x, y)
        t_kan, t_mlp = timer.compare(step, mlp_step)
        add("train_step", basis, f"kan{widths} / mlp", t_kan * 1e3, t_mlp * 1e3, TRAIN_TARGETS.get(basis))
        kan.eval()
        with torch.no_grad():
            dense_infer, t_mlp = timer.compare(lambda m=kan: m(x), lambda: mlp(x))
        add("inference", basis, f"kan{widths} / mlp", dense_infer * 1e3, t_mlp * 1e3, INFER_TARGETS.get(basis))
        kan.train()
        mem, largest = step_memory(kan, x, y, dev)
        add("train_memory", basis, f"kan{widths} / mlp", mem / 2**20, mlp_mem / 2**20, unit="MiB")
        widest = max(batch * layer.in_features * layer.n_basis for _, layer in kan_layers(kan)) * 4
        add("largest_saved_tensor", basis, "largest saved / [B, in, n_basis] of widest layer", largest / 2**20,
            widest / 2**20, 1.0 + 1.0 / kan.layers[0].n_basis + 1e-9, unit="MiB")
        if not compressed:
            continue
        kan.eval()
        for name, (method, hyper, target) in COMPRESSED.items():
            try:
                small = _compress(kan, method, hyper, x, y, dev)
            except Exception as exc:  # report, do not hide: the row says why
                log(f"  {basis} {name}: could not compress ({type(exc).__name__}: {exc})")
                continue
            with torch.no_grad():
                t, t_dense = timer.compare(lambda m=small: m(x), lambda m=kan: m(x))
            add("compressed_inference", basis, f"{name} / dense", t * 1e3, t_dense * 1e3, target)
            if name in RUNTIME_TARGETS:
                _runtime_rows(add, timer, name, basis, small, kan, x)
    if anchors:
        _anchor_rows(add, timer, dev, widths, x, y, mlp, mlp_step, log)
    if conv_channels:
        _conv_rows(add, timer, dev, bases, list(conv_channels), conv_batch, tuple(conv_shape), widths[-1], log, fused)
    return pd.DataFrame(rows)


# The run-time forms that stay compressed (bench.deploy.compact): target batch-1 latency ratio to dense
RUNTIME_TARGETS = {"codebook K=16": 0.5, "quantised 8-bit": None, "quantised 4-bit": None, "pruned 8x": None}
# bytes held at run time / counted bytes, for the forms that keep their codes (a pruned layer keeps a dense
# weight over its active inputs: the smaller shape, not the counted bytes)
HELD_TARGETS = {"codebook K=16": 2.0, "quantised 8-bit": 2.0, "quantised 4-bit": 2.0}


def _runtime_rows(add, timer, name, basis, small, dense, x) -> None:
    """The compressed form as deployed (:func:`bench.deploy.compact`) against its dense model: batch-1
    latency, batch-256 time, and the bytes each holds at run time over the compressed model's counted
    bytes (the dense model's own bytes for reference)."""
    from bench.compression.storage import storage_report
    from bench.deploy import compact, held_bytes
    from bench.deploy.native import NativeCodebookLayer

    deployed = compact(small)
    counted = storage_report(small).stored_bits / 8
    native = [layer for _, layer in kan_layers(deployed) if isinstance(layer, NativeCodebookLayer)]
    with torch.no_grad():
        for rows, label in ((x[:1], "batch 1"), (x, f"batch {x.shape[0]}")):
            form = f"deployed, {native[0].path(rows.shape[0])}" if native else "deployed"
            t, t_dense = timer.compare(lambda m=deployed, r=rows: m(r), lambda r=rows: dense(r))
            add("compressed_runtime", basis, f"{name} {label}: {form} / dense", t * 1e3, t_dense * 1e3,
                RUNTIME_TARGETS[name] if label == "batch 1" else None)
        small(x)  # the loaded form as the harness evaluates it (its decompressed cache included)
    add("compressed_runtime", basis, f"{name}: bytes held deployed / counted", held_bytes(deployed) / 2**20,
        counted / 2**20, HELD_TARGETS.get(name), unit="MiB")
    add("compressed_runtime", basis, f"{name}: bytes held as evaluated / counted", held_bytes(small) / 2**20,
        counted / 2**20, unit="MiB")


def _anchor_rows(add, timer, dev, widths, x, y, mlp, mlp_step, log) -> None:
    """Each installed anchor library's KAN against the same MLP, and the project's default bspline KAN
    against it directly (ratio project / anchor: below 1, the project is faster), all in this process."""
    torch.manual_seed(0)
    ours = KAN(widths, "bspline").to(dev)
    ours_step, _ = train_step(ours, x, y)
    for name in ANCHORS:
        version, build = load_anchor(name)
        if version is None:
            log(f"anchor {name}: skipped, {build}")
            continue
        torch.manual_seed(0)
        net = build(widths).to(dev)
        log(f"anchor {name} {version}: {type(net).__name__}{widths}, {n_params(net):,} params")
        step, _ = train_step(net, x, y)
        step()  # its compilation, outside the timing
        t_net, t_mlp = timer.compare(step, mlp_step)
        add("anchor_train_step", name, f"{name} {version} kan{widths} / mlp", t_net * 1e3, t_mlp * 1e3)
        t_ours, t_net = timer.compare(ours_step, step)
        add("anchor_train_step", name, f"project bspline / {name} {version}", t_ours * 1e3, t_net * 1e3, 1.0)
        net.eval()
        ours.eval()
        with torch.no_grad():
            t_net, t_mlp = timer.compare(lambda m=net: m(x), lambda: mlp(x))
            add("anchor_inference", name, f"{name} {version} kan{widths} / mlp", t_net * 1e3, t_mlp * 1e3)
            t_ours, t_net = timer.compare(lambda: ours(x), lambda m=net: m(x))
            add("anchor_inference", name, f"project bspline / {name} {version}", t_ours * 1e3, t_net * 1e3, 1.0)
        ours.train()


def _conv_rows(add, timer, dev, bases, channels, batch, shape, n_out, log, fused: bool = False) -> None:
    from bench.model.bases import use_fused_features
    from bench.model.kan import ConvKAN, KANConv2d

    x = torch.randn(batch, *shape, device=dev)
    y = torch.randint(0, n_out, (batch,), device=dev)
    arch = f"convkan{channels}"
    for basis in bases:
        torch.manual_seed(0)
        kan = ConvKAN(shape, n_out, channels, norm="batch", basis=basis).to(dev)
        cnn = matched_cnn(shape[0], channels, n_out, n_params(kan)).to(dev)
        widths = [m.out_channels for m in cnn if isinstance(m, nn.Conv2d)]
        log(f"{basis} {arch}: {n_params(kan):,} params; CNN {widths}: {n_params(cnn):,} params")
        kan_step, _ = train_step(kan, x, y)
        cnn_step, _ = train_step(cnn, x, y)
        t_kan, t_cnn = timer.compare(kan_step, cnn_step)
        add("conv_train_step", basis, f"{arch} / same-layout cnn{widths}", t_kan * 1e3, t_cnn * 1e3, CONV_TRAIN_TARGET)
        if fused:  # the sweep option train.compile: the same step with the compiled basis features

            def switched(on, f=kan_step):
                def g():
                    use_fused_features(on)
                    f()
                return g

            mode = use_fused_features(True)
            try:
                switched(True)()  # compile outside the timing
                t_fused, t_eager = timer.compare(switched(True), switched(False))
            finally:
                use_fused_features(mode)
            add("conv_fused_features", basis, f"{arch} train step: compiled / eager features",
                t_fused * 1e3, t_eager * 1e3)
        kan.eval()
        cnn.eval()
        with torch.no_grad():
            t_kan, t_cnn = timer.compare(lambda k=kan: k(x), lambda c=cnn: c(x))
        add("conv_inference", basis, f"{arch} / same-layout cnn{widths}", t_kan * 1e3, t_cnn * 1e3)
        conv = next(m for m in kan.modules() if isinstance(m, KANConv2d) and m.in_channels > 1)
        if conv.fast:
            xin = torch.randn(batch, conv.in_channels, shape[1] // 2, shape[2] // 2, device=dev, requires_grad=True)

            def run(f, xin=xin):
                return lambda: f(xin).square().mean().backward()

            t_fast, t_unfold = timer.compare(run(conv.forward), run(conv.forward_unfold))
            add("conv_fast_vs_unfold", basis, f"KANConv2d {conv.in_channels}->{conv.out_channels} fwd+bwd: "
                "fast / unfold", t_fast * 1e3, t_unfold * 1e3, 1.0)


def format_table(df: pd.DataFrame) -> str:
    lines = [f"(a ratio within {NOISE:.0%} of its target counts as meeting it: timer noise)",
             f"{'kind':22s} {'basis':10s} {'subject':62s} {'value':>10s} {'ref':>10s} {'ratio':>7s}  target"]
    for r in df.to_dict("records"):
        target = "" if r["target"] is None or pd.isna(r["target"]) else (
            f"<= {r['target']:.3g}  {'ok' if r['meets_target'] else 'MISSED'}")
        unit = r["unit"]
        lines.append(f"{r['kind']:22s} {r['basis']:10s} {r['subject'][:62]:62s} {r['value']:7.2f}{unit:>3s} "
                     f"{r['reference']:7.2f}{unit:>3s} {r['ratio']:7.2f}  {target}")
    return "\n".join(lines)


def main(args) -> int:
    import platform

    from bench.model.bases import features_path

    df = run_perf(args.device, args.batch, args.widths, args.bases, args.repeats, not args.no_compressed,
                  conv_channels=args.conv_channels, conv_batch=args.conv_batch, fused=args.fused,
                  anchors=args.anchors)
    print(f"machine: {platform.machine()} {platform.processor()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {args.device}, KAN features {features_path()}")
    print(format_table(df))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    print(f"wrote {out}")
    return 0
