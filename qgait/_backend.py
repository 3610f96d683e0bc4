"""Backend selection shared by every qgait op.

Each op lists its backends in priority order. A backend answers ``why_not(*args)`` with the
reasons it cannot take these inputs (an empty list means it can). The choice is

* the ``backend=`` argument if given, else the ``QGAIT_BACKEND`` environment variable;
* otherwise ("auto") the first backend with no reasons, skipping backends marked
  ``auto=False`` for the inputs' device (Triton on the CPU runs only in its slow interpreter).

When the asked backend (or, in auto mode, every backend) cannot take the inputs, the error
lists each backend's reasons, so the user sees what to change.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

BACKENDS = ("cuda", "triton", "cpu", "reference")


@dataclass(frozen=True)
class Backend:
    name: str
    why_not: Callable[..., list[str]]
    run: Callable
    auto_on_cpu: bool = True  # may "auto" pick it for CPU tensors?


def requested_backend(backend: str | None) -> str:
    name = backend if backend is not None else os.environ.get("QGAIT_BACKEND", "auto")
    name = (name or "auto").lower()
    if name != "auto" and name not in BACKENDS:
        raise ValueError(
            f"qgait: unknown backend {name!r}; expected 'auto' or one of {', '.join(BACKENDS)}"
        )
    return name


def select(op: str, backends: Sequence[Backend], backend: str | None, on_cpu: bool, *args):
    """Returns the Backend to run ``op`` on these inputs, or raises with every reason."""
    name = requested_backend(backend)
    reasons: dict[str, list[str]] = {}
    for b in backends:
        if name != "auto" and b.name != name:
            continue
        why = list(b.why_not(*args))
        if name == "auto" and on_cpu and not b.auto_on_cpu and not why:
            why = ["not chosen automatically for CPU tensors (ask for it with backend=)"]
        if not why:
            return b
        reasons[b.name] = why
    if name != "auto" and name not in reasons:
        reasons[name] = [f"no {name} implementation of this op"]
    lines = "\n".join(f"  {k}: {'; '.join(v)}" for k, v in reasons.items())
    asked = f"backend {name!r}" if name != "auto" else "any backend"
    raise RuntimeError(f"qgait::{op}: {asked} cannot run these inputs:\n{lines}")


# --- reasons shared by every op --------------------------------------------------------------
# Computed from values an op looks up once at import (kernel presence, Triton's status): the
# dispatcher query itself must stay out of the call path, which torch.compile traces.

def native_reasons(has_kernel: bool, device: str, x) -> list[str]:
    """Why the C++ kernels for ``device`` ("cpu" / "cuda") cannot take an input like ``x``."""
    from qgait import _ext

    why = []
    if not has_kernel:
        if not _ext.HAS_C:
            why.append(f"qgait._C is not loaded ({_ext.C_ERROR})")
        else:
            why.append(f"qgait._C has no {device.upper()} kernel for this op"
                       + (" (built without CUDA)" if device == "cuda" else ""))
    if x.device.type != device:
        why.append(f"inputs are on {x.device.type}, not {device}")
    return why


def triton_reasons(triton_status: tuple[bool, str], x) -> list[str]:
    """Why Triton cannot take an input like ``x``; ``triton_status`` is ``_ext.triton_status()``."""
    ok, status = triton_status
    why = [] if ok else [status]
    if x.device.type == "cpu" and ok and not status.startswith("interpreter"):
        why.append("inputs are on the CPU and TRITON_INTERPRET=1 is not set")
    return why


def float_reasons(x, allowed, name: str = "x") -> list[str]:
    """``[]`` when ``x.dtype`` is in ``allowed``, else the reason."""
    if x.dtype in allowed:
        return []
    return [f"{name} dtype {x.dtype} is not " + "/".join(str(d).split(".")[-1] for d in allowed)]
