"""Test-only method for the executor tests: a worker that dies mid-run, once."""

import os
from dataclasses import dataclass
from pathlib import Path

from bench.compression.methods import Method, register_method


@register_method("crash_once")
class CrashOnce(Method):
    """Kills its own process inside compress the first time (marker file absent), then acts as dense."""

    test_only = True

    @dataclass
    class Config:
        marker: str = ""  # file created just before the first crash; empty: never crash

    def compress(self, model, ctx):
        marker = Path(self.config.marker)
        if self.config.marker and not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(1)  # a lost worker: no exception, no cleanup, no row from the worker


@register_method("own_stage")
class OwnStage(Method):
    """Trains its own stage-1 model (``prepare`` overridden); ``knob`` is a post-training option that shares it."""

    test_only = True

    @dataclass
    class Config:
        tag: int = 0  # a stage field: a different tag is a different stage-1 model
        knob: int = 0  # not a stage field: runs differing only here share one stage-1 model

    stage_fields = ("tag",)

    def prepare(self, model):
        model.stage_tag = self.config.tag
