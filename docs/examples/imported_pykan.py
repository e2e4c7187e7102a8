"""The worked example of importing a KAN: pykan fits, the harness compresses.

    python docs/examples/imported_pykan.py [--out results/imported]

1. For seeds 0, 1, 2: pykan 0.2.8 builds ``KAN(width=[2, 8, 1], grid=5, k=3, seed=seed)`` and fits it
   with its own ``fit()`` (LBFGS, grid updates from the samples) on the harness's training split of
   ``eq_exp_sin`` for that seed, refines the grid 5 -> 10 and fits again: per-input, non-uniform knots,
   as every fitted pykan model has. Validation and test are held out.
2. Each model is imported exactly (``bench.interop.import_model``; the error against pykan's own
   outputs is printed) and written to ``OUT/bases/pykan_seed{seed}.kanb``.
3. ``python -m bench run --config docs/examples/imported_pykan.toml --out OUT --base-model
   OUT/bases/pykan_seed{seed}.kanb`` compresses them: the
   ``dense`` row is pykan's model as given, the ``dense_ft`` control and every post-training method and
   pipeline fine-tune under the same budget; the leaderboard lands in ``OUT``.

Needs pykan (``pip install -e '.[interop]'``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from bench.cli import main as bench_main
from bench.compression.storage import export_model
from bench.data import get_dataset
from bench.interop import import_model
from bench.registry import load_plugins
from bench.run.runner import derive_seed

HERE = Path(__file__).resolve().parent
WIDTH, GRID, REFINED, STEPS = [2, 8, 1], 5, 10, 50


def fit_pykan(seed: int, splits):
    from kan import KAN

    data = {"train_input": splits.x_train, "train_label": splits.y_train,
            "test_input": splits.x_val, "test_label": splits.y_val}
    with tempfile.TemporaryDirectory() as tmp:  # pykan logs into ./model once refine() turns auto_save on
        cwd = os.getcwd()
        os.chdir(tmp)
        os.mkdir("model")
        try:
            model = KAN(width=list(WIDTH), grid=GRID, k=3, seed=seed, auto_save=False)
            model.fit(data, opt="LBFGS", steps=STEPS, update_grid=True)
            model = model.refine(REFINED)
            model.auto_save = False
            model.fit(data, opt="LBFGS", steps=STEPS, update_grid=True)
        finally:
            os.chdir(cwd)
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/imported")
    args = ap.parse_args(argv)
    out = Path(args.out)
    (out / "bases").mkdir(parents=True, exist_ok=True)
    load_plugins()
    ds = get_dataset("eq_exp_sin")
    for seed in (0, 1, 2):
        splits = ds.load(None, derive_seed(seed, "eq_exp_sin", "split"))  # the split the sweep uses
        theirs = fit_pykan(seed, splits)
        ours = import_model(theirs)
        with torch.no_grad():
            err = float((ours(splits.x_test) - theirs(splits.x_test)).abs().max())
            rmse = float(((theirs(splits.x_val) - splits.y_val) ** 2).mean().sqrt())
        export_model(ours, out / "bases" / f"pykan_seed{seed}.kanb")
        print(f"seed {seed}: pykan val RMSE {rmse:.4f}; imported, max |error| against pykan {err:.1e}")
    return bench_main(["run", "--config", str(HERE / "imported_pykan.toml"), "--out", str(out), "--quiet",
                       "--base-model", str(out / "bases" / "pykan_seed{seed}.kanb")],
                      command="python docs/examples/imported_pykan.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
