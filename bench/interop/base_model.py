"""Sweeps over a model file: the ``imported`` model kind.

A sweep names a model file (``python -m bench import`` writes one; any exported project model works)
as a dataset's base model (``[dataset.NAME] base_model = "pykan_seed{seed}.kanb"``, or
``--base-model`` on the command line). Then the dense base is that model as given, not trained:
the ``dense`` row scores it, the ``dense_ft`` control and every post-training method and pipeline
compress it under the sweep's shared budget, and methods that train their own model (MetaKAN,
MetaCluster, Slim-KAN) train the same architecture, with the same options, from scratch with the
sweep's budget (per-input knots start uniform on the basis range: a from-scratch model has no
fitted grid). Rows record the file's library, class and SHA-256 (``base_*`` columns).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from bench.compression.storage import load_model, read_header
from bench.errors import UserError
from bench.model.kinds import ModelKind, from_config, register_model


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass
class ImportedOptions:
    file: str = field(default="", metadata={"help": "the base model file (python -m bench import writes one)"})
    sha256: str = field(default="", metadata={"help": "the file's SHA-256, recorded when the sweep is built"})
    pattern: str = field(default="", metadata={"help": "the file as the sweep names it ({seed}: one per seed)"})


def _header(options) -> dict:
    path = Path(options.file)
    if not path.is_file():
        raise UserError(f"base model file {str(path)!r} not found")
    try:
        return read_header(path)
    except Exception:
        raise UserError(f"{path} is not a model file written by `python -m bench import` or a sweep") from None


def _checked(options) -> Path:
    path = Path(options.file)
    _header(options)
    if options.sha256 and file_sha256(path) != options.sha256:
        raise UserError(f"base model file {path} changed since the sweep was built (SHA-256 differs); rerun the "
                        "command to record the new file")
    return path


@register_model("imported")
class ImportedModel(ModelKind):
    """A base model read from a file (``[dataset.X] base_model = FILE`` or ``--base-model FILE``): not trained."""

    Options = ImportedOptions
    given = True

    @classmethod
    def build(cls, options, dataset, basis, basis_kwargs):
        """The file's architecture with fresh weights (for the methods that train their own model)."""
        return from_config(_header(options)["model"])

    @classmethod
    def pretrained(cls, options):
        return load_model(_checked(options))

    @classmethod
    def provenance(cls, options) -> dict:
        origin = _header(options).get("imported_from") or {}
        return {"base_file": Path(options.file).name, "base_sha256": options.sha256 or file_sha256(options.file),
                "base_library": origin.get("library", "bench"), "base_class": origin.get("class")}

    @classmethod
    def group_options(cls, options: dict) -> dict:
        return {"base_model": options.get("pattern") or options.get("file")}  # the seeds' files are one group

    @classmethod
    def arch(cls, config):
        raise AssertionError("an imported model reports the architecture of its own kind")


def base_model_spec(file: str, dataset, seed: int) -> tuple[dict, str, dict]:
    """``(model options, basis, basis options)`` of the runs of ``dataset`` (seed ``seed``) whose base is
    ``file`` (``{seed}`` in the name is replaced by the seed); one line if the file does not fit."""
    path = Path(str(file).replace("{seed}", str(seed)))
    header = _header(ImportedOptions(str(path)))
    config = header["model"]
    if config.get("model") == "kan":
        ins, outs = config["widths"][0], config["widths"][-1]
        fits = ins == dataset.in_features and outs == dataset.n_outputs
        shape = f"{ins} inputs and {outs} outputs"
    else:
        ins, outs = config.get("input_shape", [None])[0], config.get("n_outputs")
        fits = (dataset.is_image and ins == dataset.input_shape[0] and outs == dataset.n_outputs
                and config.get("head", True))
        shape = f"{ins} input channels and {outs} outputs" + ("" if config.get("head", True) else " (no head)")
    if not fits:
        raise UserError(f"base model {path} ({shape}) does not fit dataset {dataset.name!r} "
                        f"({dataset.in_features} inputs, input shape {list(dataset.input_shape)}, "
                        f"{dataset.n_outputs} outputs)")
    options = {"file": str(path), "sha256": file_sha256(path), "pattern": str(file)}
    return options, config["basis"], {}  # the basis options are the file's (its SHA-256 is in the run id)
