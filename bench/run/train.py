"""Training and evaluation: one loop for base training, from-scratch methods and fine-tuning.

- Mini-batch AdamW over tensors already on the device (the datasets here fit in memory).
- The learning rate follows a schedule over the planned epochs: ``cosine`` (the sweeps' default;
  per step, from the initial rate down to 0 at the last planned step, every optimiser group
  scaled alike) or ``constant`` (this class's default, kept by the LoTRA transfer benchmark). A
  constant rate at the rates these KANs train well at swings validation accuracy by ~2 points
  between epochs; the cosine decay lets the model settle.
- After every epoch the model is scored on the **validation** split; the best epoch's weights
  are restored at the end (model selection never looks at the test split). With ``patience``
  > 0, training stops early once validation has not improved for that many epochs (the
  result records the epochs actually run).
- A non-finite loss raises :class:`Diverged`; the runner records the run as ``diverged``.
- Peak training memory: on CUDA, ``torch.cuda.max_memory_allocated``; on CPU, the bytes a
  training step holds (parameters, gradients, optimiser state and the activations autograd
  saves for backward, measured with saved-tensor hooks on the first batch).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from bench.data import Splits
from bench.metrics import higher_is_better, metric_name


class Diverged(RuntimeError):
    """Training produced a non-finite loss."""


SCHEDULES = ("cosine", "constant")


def adamw(params, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW (``params``: tensors or parameter groups) with PyTorch's fused kernel where it applies: one pass
    over each parameter instead of about ten (measured on ``kan [784, 64, 10]`` at batch 128 on 2 CPU cores,
    4.1 against 4.7 ms a step; the same values up to float rounding). It applies where every parameter is
    floating point, dense in memory and on a device with the kernel (on a CPU from torch 2.4); elsewhere the
    per-parameter implementation runs (:class:`MemoryOrderAdamW` says how the fused one sees a parameter)."""
    items = list(params)
    groups = [dict(g, params=list(g["params"])) for g in items] if items and isinstance(items[0], dict) else \
        [{"params": items}]
    if _fused_applies([p for g in groups for p in g["params"]]):
        return MemoryOrderAdamW(groups, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def _fused_applies(tensors: list[torch.Tensor]) -> bool:
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        devices = _get_fused_kernels_supported_devices()
    except ImportError:  # a torch without fused optimisers
        return False
    version = tuple(int(v) for v in torch.__version__.split(".")[:2])
    if version < (2, 4) and any(p.device.type == "cpu" for p in tensors):
        return False  # the CPU kernel came with torch 2.4
    return bool(tensors) and all(
        p.is_floating_point() and p.device.type in devices
        and torch.empty_like(p, device="meta").stride() == p.stride()  # dense, no gaps: a layout a gradient can share
        for p in tensors)


def memory_order(t: torch.Tensor) -> tuple[int, ...] | None:
    """The permutation of ``t``'s dimensions that walks its memory in order (``t.permute(order)`` is
    contiguous, a view of the same storage), or None where ``t`` is contiguous already or no permutation
    is (gaps, overlaps)."""
    if t.is_contiguous():
        return None
    order = tuple(sorted(range(t.dim()), key=lambda d: (-t.stride(d), d)))
    return order if t.permute(order).is_contiguous() else None


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n > 1)


class MemoryOrderAdamW(torch.optim.AdamW):
    """The fused AdamW, each parameter seen in the order it lies in memory.

    Parameters laid out for a layer's product (:class:`bench.model.sources.DenseSource`'s edge tensor is
    ``[out, in, n+1]`` with permuted strides; Tucker factors likewise) are not contiguous, and the CPU's
    fused kernel copies every such parameter, its gradient and both moments into contiguous buffers and
    the results back, each step: about a third of a ``kan [784, 64, 10]`` step's optimiser time. AdamW is
    elementwise, so this optimiser holds a contiguous view of each such parameter (the same storage,
    updated in place) and hands it the gradient viewed the same way before each step. The values are the
    fused kernel's, bit for bit (tested); measured (batch 128, 2 threads): a bspline step 2.98 -> 2.63 ms,
    rbf 4.96 -> 4.44, gram 2.89 -> 2.65.

    The kernel reads a parameter, its gradient and its state as flat buffers, so they must share one
    layout: autograd keeps a gradient in its parameter's layout (but for dimensions of size 1, where
    strides do not matter), and a gradient written by hand in another layout is copied into the
    parameter's before each step (the raw kernel would silently apply it to the wrong entries)."""

    def __init__(self, groups: list[dict], **options):
        self._params: list[torch.Tensor] = []  # every parameter, as the model holds it
        self._views: list[tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]] = []  # (param, view, order)
        viewed = []
        for g in groups:
            held = []
            for p in g["params"]:
                self._params.append(p)
                order = memory_order(p)
                if order is None:
                    held.append(p)
                    continue
                view = p.detach().permute(order)
                self._views.append((p, view, order))
                held.append(view)
            viewed.append(dict(g, params=held))
        super().__init__(viewed, fused=True, **options)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # its gradients first, so the views see them
            with torch.enable_grad():
                loss = closure()
        for p in self._params:
            g = p.grad
            if g is not None and g.layout == torch.strided and g.stride() != p.stride() and not _same_layout(p, g):
                p.grad = torch.empty_like(p).copy_(g)
        for p, view, order in self._views:  # kept until zero_grad: the same storage, counted once
            view.grad = None if p.grad is None else p.grad.permute(order)
        super().step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)  # the views' gradients: the model's, viewed, where a step has set them
        for p, _, _ in self._views:
            if p.grad is not None:
                p.grad = None if set_to_none else p.grad.zero_()


@dataclass
class FitResult:
    best_epoch: int = 0  # 0: the starting model was kept (training changed nothing)
    epochs_run: int = 0
    lr: float = float("nan")  # the initial (peak) learning rate of the default group
    best_val: float = float("nan")
    seconds: float = 0.0
    peak_memory_bytes: int = 0
    optimizer_state_bytes: int = 0
    history: list[dict] = field(default_factory=list)


def eval_batch_size(batch_size: int) -> int:
    """The batch an evaluation runs at (:meth:`Trainer.evaluate`): the training batch, at least 1,024 rows."""
    return max(batch_size, 1024)


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def recorder(store: list):
    """A saved-tensors pack hook that records every tensor autograd keeps for backward."""
    def pack(t):
        store.append(t)
        return t

    return pack


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    return tensor_bytes(v for st in opt.state.values() for v in st.values())


def step_bytes(saved: list[torch.Tensor], opt: torch.optim.Optimizer) -> int:
    """What a CPU training step holds after backward: the tensors autograd saved for it, the
    optimised parameters, their gradients and the optimiser state."""
    params = [p for group in opt.param_groups for p in group["params"]]
    return (tensor_bytes(saved) + tensor_bytes(params) + tensor_bytes(p.grad for p in params)
            + optimizer_state_bytes(opt))


def batchnorms(model: nn.Module) -> list[nn.Module]:
    """The model's BatchNorm layers that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


class Trainer:
    """Trains and scores models on one dataset's splits (already on ``device``)."""

    def __init__(self, splits: Splits, task: str, device: torch.device | str = "cpu", batch_size: int = 128,
                 lr: float = 1e-3, weight_decay: float = 0.0, seed: int = 0, progress: bool = False,
                 amp: bool = False, schedule: str = "constant", patience: int = 0):
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
        self.splits, self.task, self.device = splits, task, torch.device(device)
        self.batch_size, self.lr, self.weight_decay, self.seed = batch_size, lr, weight_decay, seed
        self.progress, self.amp = progress, amp and self.device.type == "cuda"
        self.schedule, self.patience = schedule, patience

    # ------------------------------------------------------------------ metrics
    @property
    def metric_name(self) -> str:
        return metric_name(self.task)

    @property
    def higher_is_better(self) -> bool:
        return higher_is_better(self.metric_name)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.task == "classification":
            return F.cross_entropy(out, y)
        return F.mse_loss(out, y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str = "val") -> float:
        """Accuracy in percent (classification) or RMSE (regression) on a split; NaN if any output
        is not finite."""
        x, y = self.splits.split(split)
        was_training = model.training
        model.eval()
        # accumulated on the device, read once at the end: no host sync per batch on a GPU
        correct = torch.zeros((), dtype=torch.int64, device=x.device)
        sq = torch.zeros((), dtype=torch.float64, device=x.device)
        finite = torch.ones((), dtype=torch.bool, device=x.device)
        n = 0
        step = eval_batch_size(self.batch_size)
        for i in range(0, x.shape[0], step):
            xb, yb = x[i:i + step], y[i:i + step]
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                out = model(xb).float()
            finite &= torch.isfinite(out).all()
            if self.task == "classification":
                correct += (out.argmax(1) == yb).sum()
            else:
                sq += ((out - yb) ** 2).sum().double()
            n += xb.shape[0]
        model.train(was_training)
        correct, sq = int(correct), float(sq)
        if not bool(finite):
            return float("nan")  # a model whose outputs are not finite has no score
        if self.task == "classification":
            return 100.0 * correct / max(n, 1)
        return math.sqrt(sq / max(n * (y.shape[1] if y.dim() > 1 else 1), 1))

    @torch.no_grad()
    def recalibrate_batchnorm(self, model: nn.Module, batches: int, seed: int) -> int:
        """Re-estimate every BatchNorm's running mean and variance on ``batches`` training batches
        (a seeded draw; the plain average over them, ``momentum = None``), the rest of the model in
        eval mode and nothing trained: the statistics a compressed model's changed weights produce,
        not the ones its dense base left. Returns how many BatchNorm layers were re-estimated."""
        norms = batchnorms(model)
        if not norms or batches <= 0:
            return 0
        was_training = model.training
        model.eval()
        saved = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        x = self.splits.x_train
        order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
        for b in range(min(batches, math.ceil(x.shape[0] / self.batch_size))):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size].to(x.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                model(x[idx])
        for m, mom in zip(norms, saved):
            m.momentum = mom
        model.train(was_training)
        return len(norms)

    def better(self, a: float, b: float) -> bool:
        if math.isnan(b):
            return not math.isnan(a)
        return a > b if self.higher_is_better else a < b

    # ------------------------------------------------------------------ training
    def fit(self, model: nn.Module, epochs: int, param_groups: list[dict] | None = None,
            lr: float | None = None, desc: str = "train") -> FitResult:
        """Train for up to ``epochs`` under the trainer's schedule and patience; restore the
        best-validation weights (epoch 0, the starting model, is a candidate); return what happened.

        ``lr`` (default: the trainer's) is the peak rate; ``param_groups`` (AdamW groups, each may
        carry its own ``lr`` or an ``lr_scale`` multiplying ``lr``) default to every parameter with
        ``requires_grad``. ``epochs == 0`` only scores the model.
        """
        model.to(self.device).train()
        lr = self.lr if lr is None else lr
        result = FitResult(lr=lr)
        start = time.perf_counter()
        if param_groups is None:
            param_groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
        param_groups = [dict(g) for g in param_groups if len(list(g["params"])) > 0]
        for g in param_groups:  # a group may ask for a multiple of the run's learning rate
            if "lr_scale" in g:
                g["lr"] = lr * g.pop("lr_scale")
        best_state = copy.deepcopy(model.state_dict())
        result.best_val = self.evaluate(model, "val")
        if epochs <= 0 or not param_groups:
            result.seconds = time.perf_counter() - start
            return result
        opt = adamw(param_groups, lr=lr, weight_decay=self.weight_decay)
        x, y = self.splits.x_train, self.splits.y_train
        n = x.shape[0]
        total_steps = epochs * math.ceil(n / self.batch_size)
        if self.schedule == "cosine":
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps)))
        else:
            sched = None
        g = torch.Generator().manual_seed(self.seed)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=epochs, desc=desc, leave=False, unit="ep")
        cpu_peak = 0
        check_each_batch = self.device.type != "cuda"  # a host sync per batch: free on CPU, a stall on a GPU
        for epoch in range(1, epochs + 1):
            perm = torch.randperm(n, generator=g).to(self.device)
            total, count = torch.zeros((), dtype=torch.float64, device=self.device), 0
            for bi, i in enumerate(range(0, n, self.batch_size)):
                idx = perm[i:i + self.batch_size]
                xb, yb = x[idx], y[idx]
                measure = epoch == 1 and bi == 0 and self.device.type != "cuda"
                saved: list[torch.Tensor] = []
                if measure:
                    hooks = torch.autograd.graph.saved_tensors_hooks(recorder(saved), lambda t: t)
                    hooks.__enter__()
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                    out = model(xb)
                    loss = self.loss(out.float(), yb)
                if measure:
                    hooks.__exit__(None, None, None)
                if check_each_batch and not torch.isfinite(loss):
                    raise Diverged(f"non-finite loss at epoch {epoch}, batch {bi}")
                opt.zero_grad(set_to_none=True)
                loss.backward()  # bfloat16 autocast (amp) needs no loss scaling
                opt.step()
                if sched is not None:
                    sched.step()
                if measure:
                    cpu_peak = step_bytes(saved, opt)
                    saved.clear()
                total += loss.detach().double() * xb.shape[0]
                count += xb.shape[0]
            total = float(total)  # one sync per epoch
            if not math.isfinite(total):
                raise Diverged(f"non-finite loss in epoch {epoch}")
            val = self.evaluate(model, "val")
            result.history.append({"epoch": epoch, "train_loss": total / max(count, 1), "val": val})
            if self.better(val, result.best_val) or result.best_epoch == 0 and val == result.best_val:
                result.best_val, result.best_epoch = val, epoch
                best_state = copy.deepcopy(model.state_dict())
            result.epochs_run = epoch
            if bar is not None:
                bar.set_postfix(loss=f"{total / max(count, 1):.4f}", val=f"{val:.4g}")
                bar.update(1)
            if self.patience > 0 and epoch - result.best_epoch >= self.patience:
                break  # validation has not improved for `patience` epochs
        if bar is not None:
            bar.close()
        model.load_state_dict(best_state)
        result.optimizer_state_bytes = optimizer_state_bytes(opt)
        if self.device.type == "cuda":
            result.peak_memory_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            result.peak_memory_bytes = int(cpu_peak)
        result.seconds = time.perf_counter() - start
        return result
