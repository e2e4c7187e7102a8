"""Validated hyperparameter dataclasses (methods, datasets, models share this).

A plugin declares its options as a dataclass. Range limits go in field metadata::

    @dataclass
    class Config:
        K: int = field(default=16, metadata={"min": 2, "help": "codebook size"})
        scope: str = field(default="layer", metadata={"choices": ["layer", "global"]})

:func:`build_config` turns a dict of overrides into an instance, with one clear
:class:`UserError` for an unknown key, a wrong type or an out-of-range value. A dataclass may
add a ``validate(self)`` method for cross-field checks (raise ``UserError``).
"""

from __future__ import annotations

import dataclasses
import math
import typing

from .errors import UserError


def _type_ok(value, tp) -> tuple[bool, object]:
    """Check (and gently coerce) ``value`` against annotation ``tp``."""
    origin = typing.get_origin(tp)
    if tp is typing.Any:
        return True, value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return True, None
                continue
            ok, v = _type_ok(value, arm)
            if ok:
                return True, v
        return False, value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        args = typing.get_args(tp)
        inner = args[0] if args else typing.Any
        out = []
        for v in value:
            ok, cv = _type_ok(v, inner)
            if not ok:
                return False, value
            out.append(cv)
        return True, list(out) if origin is list else tuple(out)
    if origin is dict:
        return isinstance(value, dict), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    return True, value


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def build_config(cls: type, overrides: dict | None, owner: str):
    """Instantiate dataclass ``cls`` from ``overrides``; ``owner`` names it in errors."""
    overrides = dict(overrides or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in overrides:
        if key not in fields:
            raise UserError(f"{owner} has no option {key!r}; valid: {', '.join(fields) or '(none)'}")
    values = {}
    for key, value in overrides.items():
        f, tp = fields[key], hints[key]
        ok, value = _type_ok(value, tp)
        if not ok:
            raise UserError(f"{owner} option {key}={value!r} must be {_type_name(tp)}")
        meta = f.metadata
        if "choices" in meta and value not in meta["choices"]:
            raise UserError(f"{owner} option {key}={value!r} is not allowed; valid: "
                            f"{', '.join(map(str, meta['choices']))}")
        nums = value if isinstance(value, (list, tuple)) else [value]
        for v in nums:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                if "min" in meta and v < meta["min"]:
                    raise UserError(f"{owner} option {key}={value!r} is out of range; must be >= {meta['min']}")
                if "max" in meta and v > meta["max"]:
                    raise UserError(f"{owner} option {key}={value!r} is out of range; must be <= {meta['max']}")
        values[key] = value
    cfg = cls(**values)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def describe(cls: type) -> list[tuple[str, str, object, str]]:
    """``(name, type, default, help)`` for every option, for ``bench list``."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        extra = []
        if "choices" in f.metadata:
            extra.append("one of " + "|".join(map(str, f.metadata["choices"])))
        if "min" in f.metadata:
            extra.append(f">= {f.metadata['min']}")
        if "max" in f.metadata:
            extra.append(f"<= {f.metadata['max']}")
        help_ = f.metadata.get("help", "")
        rows.append((f.name, _type_name(hints[f.name]), default, "; ".join(filter(None, [help_, *extra]))))
    return rows


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def positive(name: str, value: float) -> None:
    """UserError unless ``value`` is a finite number > 0 (learning rates)."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise UserError(f"{name} must be a positive number, got {value!r}")
