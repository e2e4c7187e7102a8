"""Deploying compressed KANs: an ONNX graph that keeps each layer's compressed form
(:func:`export_onnx`, ``python -m bench export``) and its check against the PyTorch model with
onnxruntime (:func:`check_onnx`)."""

from .onnx_export import ExportRefused, OnnxExport, check_onnx, export_onnx, onnx_row

__all__ = ["ExportRefused", "OnnxExport", "check_onnx", "export_onnx", "onnx_row"]
