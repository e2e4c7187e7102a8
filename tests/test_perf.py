"""`bench perf`: the measurement code runs and reports ratios (correctness of the fast paths
themselves is tested next to each path: bases, codebook, Tucker, masked sources)."""

import math

from bench.cli import main
from bench.run.perf import format_table, matched_mlp, n_params, run_perf, step_memory


def test_matched_mlp_has_about_the_kan_parameter_count():
    mlp = matched_mlp([784, 64, 10], 457_418)
    assert abs(n_params(mlp) - 457_418) / 457_418 < 0.002


def test_run_perf_tiny(tmp_path):
    df = run_perf("cpu", batch=16, widths=[20, 8, 4], bases=["bspline", "rbf"], repeats=1, log=lambda *a: None,
                  conv_channels=[4, 6], conv_batch=4, conv_shape=(1, 8, 8))
    kinds = set(df["kind"])
    assert kinds == {"train_step", "inference", "train_memory", "largest_saved_tensor", "compressed_inference",
                     "compressed_runtime", "conv_train_step", "conv_inference", "conv_fast_vs_unfold"}
    assert df["ratio"].map(math.isfinite).all() and (df["value"] > 0).all()
    subjects = set(df.loc[df.kind == "compressed_inference", "subject"])
    assert subjects == {"codebook K=16 / dense", "quantised 8-bit / dense", "quantised 4-bit / dense",
                        "pruned 8x / dense", "tucker default / dense"}
    runtime = df[df.kind == "compressed_runtime"]
    assert len(runtime) == 2 * 4 * 4  # bases x forms x (batch 1, batch B, bytes deployed, bytes evaluated)
    by = runtime.set_index(["basis", "subject"])["ratio"]
    by = by[~by.index.get_level_values(1).str.startswith("pruned")]  # a dense weight over the active inputs
    held = by[by.index.get_level_values(1).str.contains("bytes held deployed")]
    evaluated = by[by.index.get_level_values(1).str.contains("bytes held as evaluated")]
    # codes and indices, no float copy (on this tiny model the bases' fixed buffers are a visible part)
    assert (held <= 2.5).all() and (held.to_numpy() < evaluated.to_numpy()).all(), (held, evaluated)
    assert "train_step" in format_table(df)
    import os
    import shutil

    codebook = runtime[runtime.subject.str.startswith("codebook K=16 batch")]
    kernel = "native kernel" if shutil.which(os.environ.get("CC", "cc")) else "PyTorch (no compiler)"
    assert len(codebook) == 2 * 2 and codebook.subject.str.contains(kernel).all(), list(codebook.subject)


def test_matched_cnn_has_the_layout_and_about_the_parameter_count():
    from bench.model.kan import ConvKAN
    from bench.run.perf import matched_cnn

    kan = ConvKAN((1, 28, 28), 10, [16, 32, 64], norm="batch")
    cnn = matched_cnn(1, [16, 32, 64], 10, n_params(kan))
    assert abs(n_params(cnn) - n_params(kan)) / n_params(kan) < 0.05
    assert [type(m).__name__ for m in cnn][:4] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]


def test_step_memory_counts_saved_activations():
    import torch

    from bench.model.kan import KAN

    small, big = KAN([20, 8, 4]), KAN([20, 8, 4])
    x, y = torch.randn(8, 20), torch.randint(0, 4, (8,))
    m1, _ = step_memory(small, x, y, torch.device("cpu"))
    m2, _ = step_memory(big, torch.randn(64, 20), torch.randint(0, 4, (64,)), torch.device("cpu"))
    assert m2 > m1 > 3 * n_params(small) * 4  # params + grads + two AdamW moments, plus activations


def test_perf_cli_writes_csv_and_rejects_bad_input(tmp_path, capsys):
    out = tmp_path / "perf.csv"
    assert main(["perf", "--device", "cpu", "--batch", "8", "--widths", "12,6,3", "--bases", "gram", "--repeats",
                 "1", "--no-compressed", "--conv-channels", "", "--out", str(out)]) == 0
    assert out.read_text().startswith("kind,")
    assert main(["perf", "--bases", "nope", "--out", str(out)]) == 2
    assert "unknown basis 'nope'" in capsys.readouterr().err
    assert main(["perf", "--batch", "0"]) == 2


def test_run_perf_fused_rows_time_the_compiled_features_against_eager():
    df = run_perf("cpu", batch=16, widths=[20, 8, 4], bases=["bspline"], repeats=1, log=lambda *a: None,
                  compressed=False, conv_channels=[4, 6], conv_batch=4, conv_shape=(1, 8, 8), fused=True)
    row = df[df.kind == "conv_fused_features"]
    assert len(row) == 1 and (row["value"] > 0).all() and (row["reference"] > 0).all()
    from bench.model.bases import _FUSED

    assert _FUSED["mode"] is None  # back to the default


def test_perf_anchors_time_installed_libraries_and_skip_absent_ones(monkeypatch):
    """--anchors: an installed library's KAN is timed against the MLP and against the project's bspline
    (ratio project / anchor), one it cannot import is skipped with its reason."""
    import sys
    import types

    import torch

    from bench.run import perf

    lib = types.ModuleType("fake_fastkan_lib")
    lib.__version__ = "9.9"

    class KANNetwork(torch.nn.Module):  # a stand-in with the libraries' constructor: widths
        def __init__(self, widths):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(widths[0], widths[1]), torch.nn.SiLU(),
                                           torch.nn.Linear(widths[1], widths[-1]))

        def forward(self, x):
            return self.net(x)

    lib.KANNetwork = KANNetwork
    monkeypatch.setitem(sys.modules, "fake_fastkan_lib", lib)
    monkeypatch.setattr(perf, "ANCHORS", {"fake": ("fake_fastkan_lib", "KANNetwork", lambda c, w: c(w)),
                                          "absent": ("no_such_kan_library", "KANNetwork", lambda c, w: c(w))})
    said = []
    df = run_perf("cpu", batch=16, widths=[20, 8, 4], bases=["bspline"], repeats=1, log=said.append,
                  compressed=False, conv_channels=[], anchors=True)
    rows = df[df.kind.isin(["anchor_train_step", "anchor_inference"])]
    assert set(rows["subject"]) == {"fake 9.9 kan[20, 8, 4] / mlp", "project bspline / fake 9.9"}
    assert len(rows) == 4 and (rows["value"] > 0).all() and (rows["reference"] > 0).all()
    assert rows.loc[rows.subject.str.startswith("project"), "target"].eq(1.0).all()
    assert any(line.startswith("anchor absent: skipped, not installed") for line in said)
