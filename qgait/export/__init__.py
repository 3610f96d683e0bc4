"""Deployment exports: ONNX (QDQ) graphs of fake-quant models and an onnxruntime embedder."""
from qgait.export.embedder import OnnxEmbedder  # noqa: F401
from qgait.export.onnx import export_onnx, ort_int4_support  # noqa: F401
