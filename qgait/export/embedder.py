"""``OnnxEmbedder``: an exported model in onnxruntime (CPU) behind qgait's embedding interface,
so that ``qgait eval`` and :func:`qgait.evaluation.evaluate` run ONNX models like torch ones."""
from __future__ import annotations

import numpy as np
import torch


class OnnxEmbedder:
    """Runs an exported model with onnxruntime on the CPU, with qgait's embedding interface.

    ``embedder(x [N, 1, T, H, W] float, seqL=None) -> torch.Tensor [N', C, P]`` float32, where
    ``N' = N``, or ``len(seqL)`` when ``seqL`` lists the frame counts of sequences packed along T
    (then N = 1). Each sequence runs on its own (the graph's input is one sequence), so this
    is a drop-in ``embed_fn`` for ``qgait.evaluation.evaluate``.

    Args:
        path: an .onnx file written by :func:`export_onnx`.
        threads: onnxruntime intra-op threads (default: onnxruntime's choice).
        optimization: onnxruntime graph optimization level name ("all", "extended", "basic",
            "disable").
    """

    def __init__(self, path, threads: int | None = None, optimization: str = "all"):
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("qgait.OnnxEmbedder: needs onnxruntime (pip install onnxruntime)") \
                from e
        levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
        if optimization not in levels:
            raise ValueError(f"OnnxEmbedder: optimization must be one of {list(levels)}, "
                             f"got {optimization!r}")
        so = ort.SessionOptions()
        so.graph_optimization_level = levels[optimization]
        if threads:
            so.intra_op_num_threads = int(threads)
        self.path = str(path)
        self.session = ort.InferenceSession(self.path, so, providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input_name, self.output_name = inp.name, self.session.get_outputs()[0].name
        self.input_shape = list(inp.shape)  # [1, 1, "T", H, W]

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def __call__(self, x: torch.Tensor, seqL=None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[1] != 1:
            raise ValueError(f"OnnxEmbedder: x must be a tensor [N, 1, T, H, W], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x)}")
        H, W = self.input_shape[3], self.input_shape[4]
        if isinstance(H, int) and isinstance(W, int) and tuple(x.shape[3:]) != (H, W):
            raise ValueError(f"OnnxEmbedder: the model takes {H}x{W} frames, got "
                             f"{tuple(x.shape[3:])}")
        xs = x.detach().float().cpu().numpy()
        if seqL is not None:
            seqL = [int(s) for s in (seqL.tolist() if isinstance(seqL, torch.Tensor) else seqL)]
            if x.shape[0] != 1 or not seqL or min(seqL) < 1 or sum(seqL) != x.shape[2]:
                raise ValueError(f"OnnxEmbedder: seqL {seqL} must be positive and sum to "
                                 f"T={x.shape[2]} with N=1, got x {tuple(x.shape)}")
            bounds = np.cumsum([0] + seqL)
            parts = [xs[:, :, a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        else:
            parts = [xs[n:n + 1] for n in range(xs.shape[0])]
        outs = [self._run(np.ascontiguousarray(p)) for p in parts]
        return torch.from_numpy(np.concatenate(outs, axis=0))
