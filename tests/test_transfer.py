"""LoTRA transfer: the Tucker-update source, the benchmark's rows, the CLI (resume, errors) and its report."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bench.cli import main as cli_main
from bench.compression.storage import export_model, load_model
from bench.compression.tucker_factors import tucker_param_groups
from bench.errors import UserError
from bench.model.kan import KAN, kan_layers
from bench.report import _decimals, fmt_mean_std, transfer_section
from bench.run.results import rows_to_frame
from bench.run.train import Trainer
from bench.run.transfer import (
    LoTRASource,
    attach_lotra,
    parse_ranks,
    parse_targets,
    run_transfer,
    task_splits,
    update_bits,
)

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# [2, 8, 1] KAN, B-spline edge tensors [8, 2, 9] and [1, 8, 9]
R1_BITS = ((1 * 1 * 1 + 8 * 1 + 2 * 1 + 9 * 1) + (1 * 1 * 1 + 1 * 1 + 8 * 1 + 9 * 1)) * 32  # 39 floats
R424_BITS = ((4 * 2 * 4 + 8 * 4 + 2 * 2 + 9 * 4) + (1 * 2 * 2 + 1 * 1 + 8 * 2 + 9 * 2)) * 32  # 143 floats
FULL_BITS = ((8 * 2 + 1 * 8) * 9 + 8 + 1) * 32  # every edge tensor and bias


def test_zero_update_starts_at_base_and_only_update_trains():
    torch.manual_seed(0)
    m = KAN([2, 8, 1], basis="bspline")
    x = torch.rand(32, 2) * 2 - 1
    with torch.no_grad():
        y0 = m(x)
    base_tensors = [layer.edge_tensor().detach().clone() for _, layer in kan_layers(m)]
    attach_lotra(m, [4, 2, 4])
    with torch.no_grad():
        assert torch.equal(m(x), y0) or float((m(x) - y0).abs().max()) < 1e-6
    # [8, 2, 9] -> (4, 2, 4); [1, 8, 9] -> out capped at 1, basis 4 lowered to 1*2
    assert [layer.source.update.ranks for _, layer in kan_layers(m)] == [(4, 2, 4), (1, 2, 2)]
    per_task = (4 * 2 * 4 + 8 * 4 + 2 * 2 + 9 * 4) + (1 * 2 * 2 + 1 * 1 + 8 * 2 + 9 * 2)
    assert update_bits(m) == per_task * 32 == 143 * 32 == R424_BITS
    trainable = {id(p) for p in m.parameters() if p.requires_grad}
    assert trainable == {id(p) for _, layer in kan_layers(m) for p in layer.source.update.factors().values()}
    groups = tucker_param_groups(m, 1e-3)
    assert len(groups) == 8 and len({g["lr"] for g in groups}) > 2
    assert all(g["lr"] == 1e-3 for g in tucker_param_groups(m, 1e-3, "shared"))
    opt = torch.optim.AdamW(groups)
    for _ in range(5):
        loss = (m(x) - torch.sin(3 * x[:, :1])).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for (_, layer), a0 in zip(kan_layers(m), base_tensors):
        assert torch.equal(layer.source.base, a0)  # the shared pre-trained tensor never moves
        assert not torch.allclose(layer.edge_tensor(), a0)  # the update does


def test_lotra_fit_leaves_a0_and_every_other_tensor_unchanged():
    torch.manual_seed(2)
    m = KAN([2, 8, 1], basis="bspline")
    a0 = [layer.edge_tensor().detach().clone() for _, layer in kan_layers(m)]
    attach_lotra(m, [2, 2, 3], torch.Generator().manual_seed(0))
    frozen = {k: v.detach().clone() for k, v in m.state_dict().items() if ".update." not in k}
    trainer = Trainer(task_splits((1.5, 0.5), 3, 128, 64, 64), "regression", "cpu", 32, 1e-2, weight_decay=0.1)
    before = trainer.evaluate(m, "val")
    res = trainer.fit(m, 4, param_groups=tucker_param_groups(m, 1e-2))
    assert res.best_epoch > 0 and res.best_val < before  # it adapted
    for (_, layer), base in zip(kan_layers(m), a0):
        assert torch.equal(layer.source.base, base)
        assert float(layer.source.update.core.detach().abs().max()) > 0
    after = m.state_dict()
    assert frozen and all(torch.equal(after[k], v) for k, v in frozen.items())  # biases, knots, A0


def test_lotra_model_exports_and_reloads(tmp_path):
    torch.manual_seed(1)
    m = KAN([2, 4, 1], basis="rbf")
    attach_lotra(m, [2, 2, 3])
    with torch.no_grad():
        for _, layer in kan_layers(m):
            layer.source.update.core.normal_()
    export_model(m, tmp_path / "l.kanb")
    back = load_model(tmp_path / "l.kanb")
    assert all(isinstance(layer.source, LoTRASource) for _, layer in kan_layers(back))
    x = torch.rand(16, 2)
    with torch.no_grad():
        assert float((back(x) - m.eval()(x)).abs().max()) < 1e-6


def test_lotra_file_reloads_in_a_fresh_process(tmp_path):
    """A fresh interpreter that imports only bench.compression.storage (no bench.run.transfer) rebuilds the model."""
    torch.manual_seed(4)
    m = KAN([2, 8, 1], basis="bspline")
    attach_lotra(m, [4, 2, 4])
    with torch.no_grad():
        for _, layer in kan_layers(m):
            layer.source.update.core.normal_()
    path = tmp_path / "adapted.kanb"
    export_model(m, path)
    x = torch.linspace(-1, 1, 10).view(5, 2)
    with torch.no_grad():
        expected = m.eval()(x).view(-1).tolist()
    code = ("import json, sys, torch\n"
            "from bench.compression.storage import load_model\n"
            "assert 'bench.run.transfer' not in sys.modules\n"
            "m = load_model(sys.argv[1])\n"
            "print(json.dumps({'types': [type(l.source).__name__ for l in m.layers],\n"
            "  'y': m(torch.linspace(-1, 1, 10).view(5, 2)).view(-1).tolist()}))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["types"] == ["LoTRASource", "LoTRASource"]
    assert np.allclose(got["y"], expected, atol=1e-6)


def test_tiny_transfer_run_rows_and_adaptation(tmp_path):
    targets = {"a=1.5": (1.5, 1.0)}
    rows = run_transfer(tmp_path, ranks_list=[[1, 1, 1], [4, 2, 4]], targets=targets, pretrain_epochs=10,
                        finetune_epochs=5, n_train=160, n_eval=128, batch_size=16, log=lambda *_: None)
    assert [(r["mode"], r["ranks"]) for r in rows] == [("zero_shot", ""), ("full", ""), ("lotra", "[1,1,1]"),
                                                       ("lotra", "[4,2,4]")]
    zero, full, r1, r4 = rows
    assert full["stored_bits"] == FULL_BITS
    assert r1["stored_bits"] == R1_BITS and r4["stored_bits"] == R424_BITS
    assert r1["stored_bits"] < r4["stored_bits"] < full["stored_bits"]
    assert r4["layer_ranks"] == "4-2-4 1-2-2"
    # adaptation never loses on validation (epoch 0 is a candidate) and here clearly gains
    assert full["val_rmse"] < 0.9 * zero["val_rmse"]
    assert r4["val_rmse"] < zero["val_rmse"]
    csv = pd.read_csv(tmp_path / "transfer.csv")
    assert len(csv) == 4 and set(csv["status"]) == {"ok"}
    assert {"host", "torch_version", "git_sha", "started_at"} <= set(csv.columns) and csv["git_sha"].notna().all()


def test_cli_end_to_end_report_and_resume(tmp_path, capsys):
    out = tmp_path / "tr"
    argv = ["transfer", "--out", str(out), "--seeds", "0,1", "--pretrain-epochs", "4", "--finetune-epochs", "2",
            "--ranks", "1,1,1", "4,2,4", "--targets", "a=1.5", "--quiet"]
    assert cli_main(argv) == 0
    first = capsys.readouterr().out
    assert first.count("pre-trained on source") == 2
    csv = pd.read_csv(out / "transfer.csv", dtype={"ranks": str})
    assert len(csv) == 8 and sorted(csv["seed"].unique()) == [0, 1] and set(csv["target"]) == {"a=1.5"}
    r1 = csv[csv["ranks"] == "[1,1,1]"]
    assert list(r1["stored_bits"]) == [R1_BITS, R1_BITS]  # hand count: 39 float32 values per task
    assert set(csv.loc[csv["mode"] == "full", "stored_bits"]) == {FULL_BITS}
    # the report: section, one table per target sorted by stored bits, mean ± std over the 2 seeds, the PNG
    md = (out / "LEADERBOARD.md").read_text()
    assert "## LoTRA transfer: target RMSE vs per-task stored bits" in md and "### target a=1.5 (a=1.5, b=1)" in md
    table = [ln for ln in md.splitlines() if ln.startswith("| ") and "mode" not in ln]
    assert [ln.split(" | ")[0] for ln in table] == ["| zero-shot", "| LoTRA", "| LoTRA", "| full fine-tune"]
    full = csv.loc[csv["mode"] == "full", "test_rmse"]
    cell = fmt_mean_std(full.mean(), full.std(), 2, _decimals("rmse", full.mean()))
    assert f"| {cell} | 1.00× ± 0.00 |" in table[-1]
    assert (out / "transfer_rmse_vs_bits.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "transfer_rmse_vs_bits.png").stat().st_size > 10_000
    # rerun: nothing recomputed (not even pre-training), every row untouched
    stamps = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out / "transfer_rows").glob("*.json")}
    assert len(stamps) == 8
    assert cli_main(argv) == 0
    second = capsys.readouterr().out
    assert "resuming: 8 of 8 rows already finished" in second and "pre-trained on source" not in second
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out / "transfer_rows").glob("*.json")} == stamps
    again = pd.read_csv(out / "transfer.csv", dtype={"ranks": str})
    assert list(again["started_at"]) == list(csv["started_at"]) and list(again["row_id"]) == list(csv["row_id"])
    # one more rank: only its 2 rows run, from the cached pre-trained models
    assert cli_main(argv[:-3] + ["2,2,2", "--targets", "a=1.5", "--quiet"]) == 0
    third = capsys.readouterr().out
    assert third.count("from cache") == 2 and "pre-trained on source a" not in third
    grown = pd.read_csv(out / "transfer.csv", dtype={"ranks": str})
    assert len(grown) == 10 and (grown["ranks"] == "[2,2,2]").sum() == 2
    kept = grown.set_index("row_id").loc[csv["row_id"], "started_at"]
    assert list(kept) == list(csv["started_at"])


def test_report_command_transfer_only_and_alongside_runs(tmp_path, capsys):
    tr = tmp_path / "tr"
    run_transfer(tr, ranks_list=[[1, 1, 1]], targets={"b=0.5": (1.0, 0.5)}, pretrain_epochs=2, finetune_epochs=1,
                 n_train=64, n_eval=64, batch_size=32, log=lambda *_: None)
    # transfer.csv only: the report holds just the transfer section
    assert cli_main(["report", str(tr), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "LEADERBOARD.md").read_text()
    assert md.startswith("# LoTRA transfer benchmark: tr") and "### target b=0.5 (a=1, b=0.5)" in md
    assert "Headline" not in md and (tmp_path / "rep" / "transfer_rmse_vs_bits.png").exists()
    # runs.csv and transfer.csv together: the usual leaderboard plus the transfer section
    run = {"run_id": "r0", "dataset": "eq_exp_sin", "task": "regression", "model": "kan", "basis": "bspline",
           "method": "dense", "method_config": "{}", "seed": 0, "status": "ok", "metric_name": "rmse",
           "metric": 0.1, "dense_metric": 0.1, "metric_delta": 0.0, "compression_ratio": 1.0,
           "coef_compression_ratio": 1.0, "stored_bits": 7200, "dense_bits": 7200}
    rows_to_frame([run]).to_csv(tr / "runs.csv", index=False)
    assert cli_main(["report", str(tr)]) == 0
    md = (tr / "LEADERBOARD.md").read_text()
    assert md.startswith("# KAN compression leaderboard: tr") and "## eq_exp_sin (rmse)" in md
    assert "## LoTRA transfer: target RMSE vs per-task stored bits" in md and "### target b=0.5" in md
    # neither: the existing one-line error
    (tmp_path / "empty").mkdir()
    assert cli_main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no runs.parquet" in err


def test_transfer_section_numbers_by_hand():
    rows = []
    for seed, (full, lot, zero) in enumerate([(0.10, 0.20, 0.5), (0.20, 0.30, 0.7)]):
        for mode, ranks, bits, rmse in [("full", "", 7200, full), ("lotra", "[1,1,1]", 1248, lot),
                                        ("zero_shot", "", 0, zero)]:
            rows.append({"seed": seed, "target": "t", "a": 2.0, "b": 1.0, "mode": mode, "ranks": ranks,
                         "status": "ok", "stored_bits": bits, "test_rmse": rmse, "pretrain_epochs": 5,
                         "finetune_epochs": 3})
    rows.append({"seed": 0, "target": "t", "a": 2.0, "b": 1.0, "mode": "lotra", "ranks": "[9,2,9]",
                 "status": "diverged", "error": "non-finite loss at epoch 1, batch 0", "stored_bits": 0})
    lines = "\n".join(transfer_section(pd.DataFrame(rows))).splitlines()
    body = [ln for ln in lines if ln.startswith("| ") and not ln.startswith("| mode") and "seed" not in ln]
    assert body[0].startswith("| zero-shot | — | — | 2 | 0 | 0.000 | 0.6000 ± 0.1414 | 4.25× ± 1.06 |")
    assert body[1].startswith("| LoTRA | [1,1,1] | — | 2 | 1,248 | 0.152 | 0.2500 ± 0.0707 | 1.75× ± 0.35 |")
    assert body[2].startswith("| full fine-tune | — | — | 2 | 7,200 | 0.879 | 0.1500 ± 0.0707 | 1.00× ± 0.00 |")
    assert "### Transfer rows that did not finish" in lines and any("diverged" in ln for ln in body[3:])


@pytest.mark.parametrize("args,fragment", [
    (["--ranks", "1,x,1"], "3 comma-separated numbers"),
    (["--ranks", "1,2"], "got 2"),
    (["--ranks", "1,0,1"], "must be > 0"),
    (["--ranks", "1.5,1,1"], "must be in (0, 1]"),
    (["--ranks", "1,1,99"], "exceeds that mode's size in every layer"),
    (["--ranks", "1,1,1", "1,1,1"], "given twice"),
    (["--targets", "c=2"], "a=<number> and/or b=<number>"),
    (["--targets", "a=fast"], "'fast' is not a number"),
    (["--seeds", "-1"], "seeds must be integers >= 0"),
    (["--seeds", "x"], "seeds must be comma-separated integers"),
    (["--pretrain-epochs", "0"], "--pretrain-epochs=0 must be an integer >= 1"),
    (["--finetune-epochs", "many"], "invalid int value"),
    (["--lr-rule", "fast"], "invalid choice"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, args, fragment):
    out = tmp_path / "never"
    assert cli_main(["transfer", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and fragment in err, err
    assert not out.exists()


def test_task_family_parsers_and_module_entry(tmp_path, capsys):
    s1, s2 = task_splits((1.0, 1.0), 0, 50, 10, 10), task_splits((1.25, 1.0), 0, 50, 10, 10)
    assert torch.equal(s1.x_train, s2.x_train) and not torch.allclose(s1.y_train, s2.y_train)
    assert parse_ranks(["1,1,1;4,2,4", "0.5,1,1.0"]) == [[1, 1, 1], [4, 2, 4], [0.5, 1, 1.0]]
    assert parse_targets(["a=1.25", "a=0.8,b=1.5", "b=0.5"]) == {"a=1.25": (1.25, 1.0), "a=0.8,b=1.5": (0.8, 1.5),
                                                                  "b=0.5": (1.0, 0.5)}
    assert cli_main(["transfer", "--out", str(tmp_path / "x"), "--ranks", "1,x,1"]) == 2
    assert "3 comma-separated numbers" in capsys.readouterr().err
    with pytest.raises(UserError):
        run_transfer(None, ranks_list=[[1, 2]], pretrain_epochs=1, finetune_epochs=1)


def test_lotra_balanced_rates_use_a0_as_the_scale():
    """tucker_param_groups on a LoTRA model: lr * rms(U) / (4 rms(A0)) per factor, and for the zero core
    the rms it has when the update is as large as A0: rms(A0) sqrt(out in (n+1) / (r1 r2 r3))."""
    torch.manual_seed(3)
    m = KAN([2, 8, 1], basis="bspline")
    attach_lotra(m, [4, 2, 4], torch.Generator().manual_seed(0))
    groups = iter(tucker_param_groups(m, 1e-2))
    for _, layer in kan_layers(m):
        src = layer.source
        rms_a = float(src.base.pow(2).mean().sqrt())
        for name, p in src.update.factors().items():
            g = next(groups)
            assert g["params"] == [p]
            if name == "core":
                want = 1e-2 * np.sqrt(np.prod(src.shape) / np.prod(src.update.ranks)) / 4
            else:
                want = 1e-2 * float(p.detach().pow(2).mean().sqrt()) / (4 * rms_a)
            assert g["lr"] == pytest.approx(want, rel=1e-6), name
    assert next(groups, None) is None  # every other parameter is frozen


def test_a_damaged_transfer_row_is_reported_and_redone(tmp_path, capsys):
    kw = dict(ranks_list=[[1, 1, 1]], targets={"b=0.5": (1.0, 0.5)}, pretrain_epochs=2, finetune_epochs=1,
              n_train=64, n_eval=64, batch_size=32, log=lambda *_: None)
    first = run_transfer(tmp_path, **kw)
    victim = tmp_path / "transfer_rows" / f"{first[-1]['row_id']}.json"
    victim.write_text('{"row_id": "' + first[-1]["row_id"] + '"')  # torn mid-write
    again = run_transfer(tmp_path, **kw)
    err = capsys.readouterr().err
    assert f"{victim} is not a valid results row" in err and "`bench transfer`" in err
    assert [r["row_id"] for r in again] == [r["row_id"] for r in first]
    assert [r["started_at"] for r in again[:-1]] == [r["started_at"] for r in first[:-1]]  # kept
    assert json.loads(victim.read_text())["status"] == "ok"  # redone and rewritten
    assert len(pd.read_csv(tmp_path / "transfer.csv")) == len(first)
