import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from bench.cli import main

PLUGINS = str(Path(__file__).parent / "plugins")
TINY = ["--plugin", PLUGINS, "--datasets", "tiny_images", "--epochs", "1", "--finetune-epochs", "1", "--quiet",
        "--device", "cpu"]


def one_line_error(capsys, argv, *fragments):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    for f in fragments:
        assert f in err, err
    return err


def test_unknown_method_names_valid_choices(capsys, tmp_path):
    one_line_error(capsys, ["run", *TINY, "--methods", "nope", "--out", str(tmp_path)], "unknown method 'nope'",
                   "dense")


@pytest.mark.parametrize("flag,value,fragment", [
    ("--datasets", "imagenet", "unknown dataset 'imagenet'"),
    ("--bases", "wavelet", "unknown basis 'wavelet'"),
    ("--models", "transformer", "unknown model 'transformer'"),
    ("--sweep", "nosuch", "unknown sweep 'nosuch'"),
    ("--seeds", "a,b", "seeds must be"),
    ("--epochs", "-3", "epochs=-3 is out of range"),
    ("--device", "tpu", "invalid choice"),
])
def test_bad_names_and_values(capsys, tmp_path, flag, value, fragment):
    argv = ["run", *TINY, "--out", str(tmp_path)]
    argv += [flag, value]
    one_line_error(capsys, argv, fragment)


def test_bad_hyperparameter_and_sweep_key_in_toml(capsys, tmp_path):
    cfg = tmp_path / "s.toml"
    cfg.write_text('methods = ["dense"]\n[method.dense]\ncolour = 3\n')
    one_line_error(capsys, ["run", *TINY, "--config", str(cfg)], "method 'dense' has no option 'colour'")
    cfg.write_text('methodz = ["dense"]\n')
    one_line_error(capsys, ["run", *TINY, "--config", str(cfg)], "unknown sweep key 'methodz'")
    cfg.write_text('[train]\nbatch_size = "big"\n')
    one_line_error(capsys, ["run", *TINY, "--config", str(cfg)], "batch_size='big' must be int")
    cfg.write_text('datasets = [')
    one_line_error(capsys, ["run", *TINY, "--config", str(cfg)], "not valid TOML")
    one_line_error(capsys, ["run", *TINY, "--config", str(tmp_path / "missing.toml")], "not found")


def test_unknown_dataset_option(capsys, tmp_path):
    cfg = tmp_path / "s.toml"
    cfg.write_text('datasets = ["tiny_images"]\n[dataset.tiny_images]\nn = 3\n')
    one_line_error(capsys, ["run", "--plugin", PLUGINS, "--config", str(cfg)], "n=3 is out of range")


def test_missing_plugin_path(capsys):
    one_line_error(capsys, ["run", "--plugin", "/no/such/file.py"], "does not exist")


def test_report_on_empty_folder(capsys, tmp_path):
    one_line_error(capsys, ["report", str(tmp_path)], "no runs.parquet")


def test_list_shows_every_registry(capsys):
    assert main(["list", "--plugin", PLUGINS]) == 0
    out = capsys.readouterr().out
    for word in ("methods:", "dense", "datasets:", "digits", "tiny_images", "bases:", "bspline", "rbf", "gram",
                 "models:", "convkan", "sweeps:", "quick"):
        assert word in out


def test_run_end_to_end_writes_results_and_leaderboard(capsys, tmp_path):
    out = tmp_path / "res"
    assert main(["run", *TINY, "--bases", "bspline,rbf", "--methods", "dense", "--out", str(out)]) == 0
    df = pd.read_parquet(out / "runs.parquet")
    assert len(df) == 2 and (df.status == "ok").all()
    assert (out / "LEADERBOARD.md").exists()
    # rerun resumes: nothing new to do
    assert main(["run", *TINY, "--bases", "bspline,rbf", "--methods", "dense", "--out", str(out)]) == 0
    assert "2 already finished" in capsys.readouterr().out
    assert len((out / "invocations.jsonl").read_text().splitlines()) == 2
    assert "Sweep call: `python -m bench" in (out / "LEADERBOARD.md").read_text()
    # report to another folder
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "LEADERBOARD.md").exists()


def test_subprocess_user_error_has_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "bench", "run", "--methods", "nope", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [p.stderr.strip()]


@pytest.mark.parametrize("dataset", ["mnist", "cifar10", "fashion_mnist"])
def test_missing_offline_data_is_one_line(capsys, tmp_path, monkeypatch, dataset):
    monkeypatch.setenv("BENCH_FASHION_MNIST_DIR", str(tmp_path / "no-debian-files"))
    cfg = tmp_path / "s.toml"
    cfg.write_text(f'datasets = ["{dataset}"]\nmethods = ["dense"]\n[dataset.{dataset}]\ndownload = false\n')
    one_line_error(capsys, ["run", "--config", str(cfg), "--data-dir", str(tmp_path / "data"), "--out",
                            str(tmp_path / "out")], dataset, str(tmp_path / "data"))


def test_non_editable_install_is_one_clear_line(capsys, monkeypatch, tmp_path):
    import bench.registry as registry

    monkeypatch.setattr(registry, "PLUGIN_DIRS", [tmp_path / "methods", tmp_path / "datasets"])
    one_line_error(capsys, ["list"], "bundled plugin folders not found", "pip install -e .")


def test_adhoc_runs_get_their_own_folders_and_never_average_budgets_as_seeds(capsys, tmp_path, monkeypatch):
    """The README's ad-hoc example (no --out) is named after what it asks, never the default sweep's
    folder; every run ends by saying where its results and leaderboard are; two budgets merged into
    one table stay two groups of one seed each, never one point of "2 seeds"."""
    from bench.cli import build_parser, default_out
    from bench.report import aggregate
    from bench.run.results import read_results

    readme = build_parser().parse_args(["run", "--datasets", "digits", "--bases", "rbf", "--methods",
                                        "dense,quantize", "--epochs", "5"])
    assert default_out(readme, "quick") == Path("results/quick_digits_rbf_dense+quantize_epochs5")
    assert default_out(build_parser().parse_args(["run"]), "quick") == Path("results/quick")
    monkeypatch.chdir(tmp_path)
    folders = []
    for epochs in ("1", "2"):
        argv = ["run", "--plugin", PLUGINS, "--datasets", "tiny_images", "--bases", "rbf", "--methods",
                "dense,dense_ft", "--epochs", epochs, "--finetune-epochs", "1", "--quiet"]
        assert main(argv) == 0
        folder = Path("results") / f"quick_tiny_images_rbf_dense+dense_ft_epochs{epochs}_ft1"
        assert capsys.readouterr().out.splitlines()[-2:] == [
            f"results: {folder}/ (runs.parquet, runs.csv, rows/)",
            f"leaderboard: {folder / 'LEADERBOARD.md'} and {folder / 'index.html'}"]
        folders.append(str(folder))
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == sorted(Path(f).name for f in folders)
    assert main(["merge", *folders, "--out", "merged", "--report"]) == 0
    points = aggregate(read_results(tmp_path / "merged"))
    dense = points[points["method"] == "dense"]
    assert len(dense) == 2 and (dense["n_seeds"] == 1).all()  # two budgets: two points, one seed each
    assert sorted(b.split(",")[0] for b in dense["budget"]) == ["epochs=1", "epochs=2"]
    md = (tmp_path / "merged" / "LEADERBOARD.md").read_text()
    assert md.count("### tiny_images / kan / rbf / epochs=") == 2


def test_run_with_no_report_says_how_to_write_it(capsys, tmp_path):
    out = tmp_path / "res"
    assert main(["run", *TINY, "--bases", "rbf", "--methods", "dense", "--out", str(out), "--no-report"]) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == [
        f"results: {out}/ (runs.parquet, runs.csv, rows/)",
        f"leaderboard: not written (--no-report); write it with: python -m bench report {out}"]
    assert not (out / "LEADERBOARD.md").exists()


def test_dry_run_prints_the_plan_and_trains_nothing(capsys, tmp_path):
    out = tmp_path / "dry"
    argv = ["run", *TINY, "--bases", "bspline", "--methods", "dense,kmeans,metakan", "--out", str(out)]
    argv.remove("--quiet")
    assert main([*argv, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "3 runs, 0 already finished, 3 to run (dry run: nothing is trained)" in text
    assert "tiny_images      kmeans          1 runs" in text
    assert "1 x dense base model (1 epochs, with its dense_ft control)" in text
    assert "1 x stage-1 model (1 epochs)" in text  # metakan trains its own model
    assert not out.exists()
    assert main([*argv, "--quiet"]) == 0  # after the real run, the plan has nothing left
    capsys.readouterr()
    assert main([*argv, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "3 already finished, 0 to run" in text and "models to train first: 0" in text


def test_patience_flag_overrides_every_dataset_and_names_the_folder(capsys):
    """``--patience`` beats the sweep's [train] and per-dataset settings (cpu.toml sets 80 and 30 for its
    equation tasks), is part of an ad-hoc folder's name, and a negative one is refused in one line."""
    from bench.cli import build_parser, default_out
    from bench.run.sweep import build_sweep, read_sweep_file

    sweep = build_sweep(read_sweep_file(None, "cpu"), {"methods": ["dense"], "seeds": [0], "patience": 7})
    assert {r.dataset for r in sweep.runs} == {"fashion_mnist", "eq_exp_sin", "eq_exp100"}
    assert {r.train["patience"] for r in sweep.runs} == {7}
    assert {r.train["patience"] for r in build_sweep(read_sweep_file(None, "cpu"), {"methods": ["dense"]}).runs} \
        == {5, 80, 30}
    args = build_parser().parse_args(["run", "--sweep", "conv", "--epochs", "15", "--patience", "5"])
    assert default_out(args, "conv") == Path("results/conv_epochs15_patience5")
    assert main(["run", *TINY, "--methods", "dense", "--patience", "-1", "--dry-run"]) == 2
    assert "patience" in capsys.readouterr().err
