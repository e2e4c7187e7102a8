"""Deploying compressed KANs: an ONNX graph that keeps each layer's compressed form
(:func:`export_onnx`, ``python -m bench export``) and its check against the PyTorch model with
onnxruntime (:func:`check_onnx`); in PyTorch, the run-time form that stays compressed (:func:`compact`)
and the bytes a model holds (:func:`held_bytes`)."""

from .onnx_export import ExportRefused, OnnxExport, check_onnx, export_onnx, onnx_row
from .runtime import compact, held_bytes

__all__ = ["ExportRefused", "OnnxExport", "check_onnx", "compact", "export_onnx", "held_bytes", "onnx_row"]
