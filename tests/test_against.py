"""``python -m bench run --against REFERENCE``: a new method on the reference leaderboard in one command."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from bench.cli import main
from bench.run.against import reference_name

PLUGINS = str(Path(__file__).parent / "plugins")
ASK = ["--plugin", PLUGINS, "--datasets", "tiny_vec6", "--bases", "bspline", "--seeds", "0,1", "--epochs", "2",
       "--finetune-epochs", "1", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ref = tmp_path_factory.mktemp("against") / "ref"
    assert main(["run", *ASK, "--methods", "dense,dense_ft,quantize(bits=4)", "--no-report", "--out", str(ref)]) == 0
    return ref


def test_new_method_joins_the_reference_and_trains_nothing_it_has(reference, tmp_path, capsys, monkeypatch):
    out = tmp_path / "new"
    assert main(["run", *ASK, "--methods", "dense,dense_ft,quantize(bits=4),kmeans(K=4)", "--against", str(reference),
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "6 of the 8 runs asked are in the reference; 2 to run" in text and "reused from its cache" in text
    assert sorted(p.name for p in (out / "cache").iterdir()) == sorted(p.name for p in (reference / "cache").iterdir())
    rows = pd.read_parquet(out / "runs.parquet")
    assert sorted(rows.method.unique()) == ["dense", "dense_ft", "kmeans", "quantize"] and len(rows) == 8
    ref_rows = rows[rows.method != "kmeans"]
    assert (ref_rows.source == str(reference.resolve())).all()  # the reference rows keep their provenance
    # ... named relative to the working directory when inside it (the same on every checkout)
    monkeypatch.chdir(reference.parent)
    assert reference_name(reference) == "ref" and reference_name("/") == "/"
    board = (out / "LEADERBOARD.md").read_text()
    assert "| kmeans |" in board and "| quantize |" in board


def test_retrained_controls_are_checked_and_a_difference_is_named(reference, tmp_path, capsys):
    ref = tmp_path / "report"  # a committed report folder: runs.csv only, no cache
    ref.mkdir()
    table = pd.read_csv(reference / "runs.csv")
    table.to_csv(ref / "runs.csv", index=False)
    assert main(["run", *ASK, "--methods", "kmeans(K=4)", "--against", str(ref), "--no-report",
                 "--out", str(tmp_path / "a")]) == 0
    captured = capsys.readouterr()
    assert "4 dense/dense_ft runs of re-trained bases to check" in captured.out
    assert "reference check: 4 re-trained dense/dense_ft rows" in captured.out and "warning" not in captured.err
    moved = table.copy()  # another machine's controls: 0.5 worse than this one reproduces
    control = moved.method == "dense_ft"
    moved.loc[control, "metric"] += 0.5
    moved.to_csv(ref / "runs.csv", index=False)
    assert main(["run", *ASK, "--methods", "kmeans(K=4)", "--against", str(ref), "--no-report",
                 "--out", str(tmp_path / "b")]) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if line.startswith("warning: re-trained controls differ")]
    assert len(warning) == 1 and "dense_ft" in warning[0] and "seed0" in warning[0] and "seed1" in warning[0]


def test_against_mistakes_are_one_line(reference, tmp_path, capsys):
    assert main(["run", *ASK, "--methods", "kmeans(K=4)", "--against", str(tmp_path / "none"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "not a results folder" in capsys.readouterr().err
    same = tmp_path / "same"
    shutil.copytree(reference, same)
    assert main(["run", *ASK, "--methods", "kmeans(K=4)", "--against", str(same), "--out", str(same)]) == 2
    assert "same folder" in capsys.readouterr().err


def test_another_budget_matches_nothing_and_says_so(reference, tmp_path, capsys):
    other = [a if a != "2" else "3" for a in ASK]  # --epochs 3: other run ids, other bases
    assert main(["run", *other, "--methods", "kmeans(K=4)", "--against", str(reference), "--dry-run",
                 "--out", str(tmp_path / "o")]) == 0
    assert "none of the runs asked share a base" in capsys.readouterr().err


def test_combined_leaderboard_says_where_its_rows_were_run(reference, tmp_path):
    out = tmp_path / "c"
    assert main(["run", *ASK, "--methods", "kmeans(K=4)", "--against", str(reference), "--out", str(out)]) == 0
    board = (out / "LEADERBOARD.md").read_text()
    assert f"6 from `{reference.resolve()}`; 2 from `this folder`" in board
