"""Deployment exports: ONNX (QDQ) graphs of fake-quant models and an onnxruntime embedder."""
from qgait.export.onnx import OnnxEmbedder, export_onnx, ort_int4_support  # noqa: F401
