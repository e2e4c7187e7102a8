"""``bench.compress``: compress one model in one call, on the runner's own code path.

    import bench
    result = bench.compress(model, "metacluster(K=16)>small_dtype", "fashion_mnist", finetune_epochs=2)
    result.model            # the compressed model, as its file stores it
    result.row["compression_ratio"], result.row["metric"], result.row["control_metric"]

The call is one run of a sweep whose dataset names ``model`` as its base model
(:mod:`bench.interop.base_model`): the ``dense_ft`` control is the given model fine-tuned with the same
budget, the method compresses the given model (methods that train their own model train its
architecture), every choice reads validation, the test split is scored once, and ``.row`` is the
results row ``python -m bench run`` would record for the same model, method, budget and seed.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bench.compression.storage import export_model, load_model
from bench.data import DATASETS, Dataset, Splits
from bench.errors import UserError
from bench.registry import load_plugins

_WORK: dict[str, Path] = {}


@dataclass
class Compressed:
    """What :func:`compress` returns: the compressed ``model`` (loaded from ``path``, the file that proves
    its size) and ``row``, the results row (``stored_bits``, ``compression_ratio``, ``metric``,
    ``val_metric``, ``control_metric``, ``info``, ...; :doc:`results columns <results-columns>`)."""

    model: nn.Module
    row: dict
    path: Path


def _digest(tensors) -> str:
    h = hashlib.sha1()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes())
    return h.hexdigest()[:12]


def user_dataset(splits: Splits) -> str:
    """Register the user's own tensors as a dataset for this process; returns its name
    (``user_<hash of the tensors>``). Integer targets ``[N]`` are a classification task, float targets
    ``[N, k]`` a regression."""
    if not isinstance(splits, Splits):
        raise UserError(f"data must be a registered dataset name or bench.data.Splits, got {type(splits).__name__}")
    tensors = [splits.x_train, splits.y_train, splits.x_val, splits.y_val, splits.x_test, splits.y_test]
    name = "user_" + _digest(tensors)
    if name in DATASETS:
        return name
    y = splits.y_train
    if y.dtype in (torch.int64, torch.int32):
        labels = (splits.y_train, splits.y_val, splits.y_test)
        task, n_out = "classification", max(int(t.max()) for t in labels) + 1
    elif y.is_floating_point() and y.dim() == 2:
        task, n_out = "regression", int(y.shape[1])
    else:
        raise UserError("targets must be int64 class labels [N] or float regression targets [N, k]; "
                        f"got {y.dtype} {list(y.shape)}")
    fixed = splits

    class UserData(Dataset):
        __doc__ = f"the caller's tensors ({task}, inputs {list(splits.x_train.shape[1:])})"
        description = __doc__
        input_shape = tuple(splits.x_train.shape[1:])
        n_outputs = n_out

        def load(self, data_dir, seed):
            return fixed

    UserData.task = task
    DATASETS.register(name)(UserData)
    return name


def compress(model: nn.Module, method: str, data: str | Splits, *, seed: int = 0, device: str = "auto",
             out: str | Path | None = None, data_dir: str | Path = "data", plugins: list | tuple = (),
             **budget) -> Compressed:
    """Compress ``model`` with ``method`` on ``data`` under the sweep's shared budget; one run of the runner.

    ``model``: a project model (:class:`~bench.model.kan.KAN`, :class:`~bench.model.kan.ConvKAN`, one
    loaded with ``load_model``) or a live module of a supported KAN library (imported exactly first,
    :func:`bench.interop.import_model`). ``method``: a name, an inline spec or a pipeline as on the
    command line (``"kmeans(K=8)"``, ``"prune(ratio=2)>kmeans>entropy_code"``). ``data``: a registered
    dataset name or your own :class:`bench.data.Splits`. ``budget``: a sweep's ``[train]`` keys
    (``epochs``, ``finetune_epochs``, ``lr``, ``finetune_lr_scale``, ``batch_size``, ...; the sweep's
    defaults otherwise); ``epochs`` only matters to methods that train their own model. ``out``: where
    the model files and caches go (default: one temporary folder per process, so repeated calls on the
    same model reuse its control). ``plugins``: method or dataset files (or folders) to load first, as
    ``--plugin`` does. A setting the model cannot meet raises :class:`bench.errors.Infeasible`.
    """
    from bench.interop import import_model as _import
    from bench.interop import recognise
    from bench.model.kinds import MODELS
    from bench.run.runner import RunEnv, run_one
    from bench.run.sweep import build_sweep

    load_plugins(list(plugins))
    if not isinstance(model, nn.Module):
        raise UserError(f"model must be a torch module, got {type(model).__name__}")
    config = model.config() if callable(getattr(model, "config", None)) else None
    if not (isinstance(config, dict) and config.get("model") in MODELS):
        if recognise(model) is None:
            raise UserError(f"bench.compress takes a project model (KAN, ConvKAN, load_model, import_model) or a "
                            f"module of a supported KAN library; got {type(model).__name__}")
        model = _import(model)
    name = data if isinstance(data, str) else user_dataset(data)
    DATASETS.lookup(name)
    work = Path(out) if out is not None else _WORK.setdefault("dir", Path(tempfile.mkdtemp(prefix="bench-api-")))
    base = work / "bases" / "base.kanb"
    export_model(model, base)  # the model as given, in the project's file format
    digest = hashlib.sha256(base.read_bytes()).hexdigest()[:16]
    path = work / "bases" / f"{digest}.kanb"
    base.replace(path)
    sweep = build_sweep({"name": "api", "datasets": [name], "methods": [method], "seeds": [int(seed)],
                         "train": budget, "device": device, "dataset": {name: {"base_model": str(path)}}})
    if len(sweep.runs) != 1:
        raise UserError(f"method {method!r} expands to {len(sweep.runs)} configurations; bench.compress runs "
                        "one: give single values, not lists")
    (spec,) = sweep.runs
    env = RunEnv(work, Path(data_dir), device)
    row = run_one(spec, env)  # raises Infeasible for a setting the model cannot meet
    file = work / "models" / f"{spec.run_id}.kanb"
    return Compressed(load_model(file), row, file)
