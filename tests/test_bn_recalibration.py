"""BatchNorm re-estimation after compression (``[train] bn_recalibration``): the statistics become the
plain average over the drawn training batches, momentum is restored, nothing else changes; a run
records the validation score before it; the trained stages and the control are not part of it (same
cache keys), and leaving it off keeps every run id."""

from pathlib import Path

import torch
from torch import nn

from bench.data import Splits
from bench.model.kan import ConvKAN
from bench.registry import load_plugins
from bench.run.plan import control_cache, stage_cache
from bench.run.runner import RunEnv, run_one
from bench.run.sweep import build_sweep
from bench.run.train import Trainer

load_plugins()
TRAIN = {"epochs": 1, "finetune_epochs": 1, "batch_size": 16, "lr": 3e-3}


def _sweep(methods, **train):
    return build_sweep({"name": "bn", "datasets": ["tiny_images"], "models": ["convkan"], "bases": ["bspline"],
                        "methods": methods, "seeds": [0], "train": {**TRAIN, **train},
                        "model": {"convkan": {"channels": [3]}}, "method": {"quantize": {"bits": 2}}})


def test_running_statistics_are_the_average_over_the_batches():
    torch.manual_seed(0)
    x = torch.randn(64, 1, 8, 8) * 3 + 1
    splits = Splits(x, torch.zeros(64, dtype=torch.long), x[:8], torch.zeros(8, dtype=torch.long),
                    x[:8], torch.zeros(8, dtype=torch.long))
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).eval()
    bn = model[1]
    bn.momentum = 0.3
    trainer = Trainer(splits, "classification", batch_size=16)
    assert trainer.recalibrate_batchnorm(model, 2, seed=5) == 1
    order = torch.randperm(64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        means = [model[0](x[order[i * 16:(i + 1) * 16]]).mean(dim=(0, 2, 3)) for i in range(2)]
    assert torch.allclose(bn.running_mean, torch.stack(means).mean(0), atol=1e-5)
    assert bn.momentum == 0.3 and not model.training
    assert Trainer(splits, "classification").recalibrate_batchnorm(nn.Linear(2, 2), 5, 0) == 0


def test_a_compressed_convkan_gets_its_own_statistics_and_the_stages_keep_their_keys(tmp_path):
    (plain,) = _sweep(["quantize"]).runs
    (recal,) = _sweep(["quantize"], bn_recalibration=3).runs
    assert "bn_recalibration" not in plain.train and plain.run_id != recal.run_id
    assert stage_cache(plain) == stage_cache(recal) and control_cache(plain) == control_cache(recal)
    env = RunEnv(tmp_path, tmp_path, "cpu")
    rows = [run_one(spec, env) for spec in (plain, recal)]
    assert all(r["status"] == "ok" for r in rows)
    import json

    info = json.loads(rows[1]["info"])
    assert info["bn_recalibration_batches"] == 3 and "val_before_bn_recalibration" in info
    assert "val_before_bn_recalibration" not in json.loads(rows[0]["info"])
    assert rows[1]["bn_recalibration"] == 3
    assert rows[1]["control_metric"] == rows[0]["control_metric"]  # the same cached control

    def stats(spec):
        from bench.compression.storage import load_model

        m = load_model(Path(tmp_path) / "models" / f"{spec.run_id}.kanb")
        return torch.cat([b.running_var for b in m.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)])

    assert not torch.equal(stats(plain), stats(recal))
    model = ConvKAN((1, 8, 8), 3, channels=[2])
    assert any(isinstance(b, nn.BatchNorm2d) for b in model.modules())  # the default ConvKAN has BatchNorm
