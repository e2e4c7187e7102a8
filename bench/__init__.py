"""KAN compression benchmark harness: models, coefficient sources, storage accounting, runner."""

__version__ = "0.1.0"
