"""The README's commands and the docs' worked method example must work as printed."""

import re
from pathlib import Path

import pandas as pd

from bench.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"
ADDING_A_METHOD = README.parent / "docs" / "adding-a-method.md"
PLUGINS = str(Path(__file__).parent / "plugins")


def test_readme_method_example_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", ADDING_A_METHOD.read_text(), flags=re.S)
    (example,) = [b for b in blocks if b.startswith("# methods/half.py")]
    plugin = tmp_path / "half.py"
    plugin.write_text(example)
    out = tmp_path / "res"
    code = main(["run", "--plugin", str(plugin), "--plugin", PLUGINS, "--datasets", "tiny_images", "--methods",
                 "dense,half", "--bases", "rbf", "--epochs", "1", "--quiet", "--device", "cpu", "--out", str(out),
                 "--no-report"])
    assert code == 0
    df = pd.read_parquet(out / "runs.parquet").set_index("method")
    assert (df.status == "ok").all()
    assert df.loc["half", "coef_compression_ratio"] == 2.0
    assert df.loc["half", "reload_max_abs_diff"] < 1e-5
    assert abs(df.loc["half", "metric"] - df.loc["dense", "metric"]) < 5


def test_readme_quotes_the_ci_command():
    ci = (README.parent / ".ci" / "run").read_text()
    cmd = "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest -q"
    assert cmd in README.read_text() and cmd.replace("pip install", "pip install -q") in ci


def test_readme_is_short_and_its_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith("http"):
            assert (README.parent / target).exists(), target
