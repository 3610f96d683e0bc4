"""Reading and writing every qgait model file, without running code from the file.

Two kinds of file, both ``torch.save`` zip archives of plain data (tensors, dicts, lists,
strings, numbers) that are read with ``torch.load(weights_only=True)``:

* **model files** (``save_model`` / ``load_model``; ``qgait convert`` writes one, a model zoo
  ships them): ``{"format": "qgait-model", "format_version": 1, "kind": "fp" | "fakequant" |
  "packed", "arch": {...}, "layers": {...}, "requantize": bool, "config": {...} | None,
  "meta": {...}, "qgait_version": str, "state_dict": {name: tensor}}``. Everything but
  ``state_dict`` is JSON. ``arch`` holds :func:`qgait.models.build_model`'s arguments,
  ``layers`` every quantized layer (``{fqn: {"type", "w_bits", "a_bits", "a_signed", ...}}``):
  the model is rebuilt from them (fp model -> ``quantize_`` of those layers -> for a packed
  model ``qgait.quant.convert``) and its state dict loaded, strictly.
* **training checkpoints** (``save_checkpoint`` / ``load_checkpoint``; ``qgait train`` writes
  ``last.pt``): ``{"format": "qgait-checkpoint", "format_version": 1, "step", "model",
  "optimizer", "scheduler", "scaler", "sampler", "rng", "config", "stage", ...}`` with the RNG
  states stored as tensors and plain numbers. :func:`load_model` also reads them (the model is
  rebuilt from the config's stage).

A file that needs anything else to unpickle (a pickled module, a numpy array, a function: what
qgait 0.1 wrote for packed models and checkpoints, or a crafted file) is refused with
:class:`ModelFileError` naming the file and what it would import; nothing from it runs. Files
of an older qgait load only when the caller opts in: ``trust_legacy=True`` here,
``--trust-legacy-file`` on the ``qgait`` commands (see docs/model_files.md).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import pickletools
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Union

import torch
import torch.nn as nn

from qgait.errors import UserError

MODEL_FORMAT = "qgait-model"
CHECKPOINT_FORMAT = "qgait-checkpoint"
FORMAT_VERSION = 1
KINDS = ("fp", "fakequant", "packed")
LEGACY_FLAG = "--trust-legacy-file"
LEGACY_PACKED_FORMAT = "qgait-packed-1"   # qgait 0.1 ``qgait convert``: a pickled module

Source = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]

__all__ = [
    "CHECKPOINT_FORMAT", "FORMAT_VERSION", "KINDS", "LEGACY_FLAG", "MODEL_FORMAT",
    "ModelFileError", "atomic_save", "atomic_write_bytes", "atomic_write_text",
    "describe_model", "file_sha256",
    "load_any", "load_checkpoint", "load_checkpoint_model", "load_model", "load_weights",
    "model_to_bytes", "read_header", "save_checkpoint", "save_model", "trusting_legacy_files",
    "upgrade_file",
]


class ModelFileError(UserError, ValueError):
    """A model file that cannot be used: missing, unreadable, not a qgait file, or refused
    because reading it would run code. The message names the file and what to do."""


# ----------------------------------------------------------------------------- writing
def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path + .tmp`` then ``os.replace``: a reader never sees a torn file,
    and a failed write leaves nothing behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and a rename."""
    atomic_write_bytes(path, text.encode())


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _json_clean(obj, what: str):
    """``obj`` through a JSON round trip (tuples become lists); a TypeError names ``what``."""
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError) as e:
        raise TypeError(f"qgait.model_io: {what} must be JSON-serialisable: {e}") from None


def _quant_classes():
    from qgait.nn.soft_quant import SOFT_QUANT_MODULES
    from qgait.ops.packed_conv3d import PackedConv3d
    from qgait.quant.convert import PackedPartLinear
    return SOFT_QUANT_MODULES, PackedConv3d, PackedPartLinear


def describe_model(model: nn.Module) -> dict:
    """The JSON description a model file stores next to the weights: ``kind``, ``arch``
    (``build_model`` arguments), ``layers`` (every quantized layer) and ``requantize``."""
    soft, PackedConv3d, PackedPartLinear = _quant_classes()
    arch = getattr(model, "arch", None)
    if not isinstance(arch, dict):
        raise TypeError(f"qgait.model_io: cannot describe a {type(model).__name__} (no .arch); "
                        "save models built by qgait.models.build_model")
    layers: dict[str, dict] = {}
    n_soft = n_packed = 0
    requantize = False
    for fqn, m in model.named_modules():
        if isinstance(m, soft):
            n_soft += 1
            layers[fqn] = {"type": type(m).__name__, "w_bits": int(m.w_bits),
                           "a_bits": None if m.a_bits is None else int(m.a_bits),
                           "a_signed": bool(m.a_signed)}
        elif isinstance(m, (PackedConv3d, PackedPartLinear)):
            n_packed += 1
            rec = {"type": type(m).__name__, "w_bits": int(m.w_bits),
                   "a_bits": None if m.a_bits is None else int(m.a_bits),
                   "a_signed": bool(m.a_signed)}
            if isinstance(m, PackedConv3d):
                rec.update(act=m.act, neg_slope=float(m.neg_slope),
                           out_quant=m.out_scale is not None, out_bits=int(m.out_bits),
                           out_signed=bool(m.out_signed))
                requantize = requantize or m.out_scale is not None
            layers[fqn] = rec
    kind = "packed" if n_packed else "fakequant" if n_soft else "fp"
    return _json_clean({"kind": kind, "arch": dict(arch), "layers": layers,
                        "requantize": requantize}, "the model description")


def _payload(model: nn.Module, meta: dict | None, config: dict | None) -> dict:
    import qgait
    desc = describe_model(model)
    state = {k: (v.detach().cpu().contiguous() if isinstance(v, torch.Tensor) else v)
             for k, v in model.state_dict().items()}
    return {"format": MODEL_FORMAT, "format_version": FORMAT_VERSION, **desc,
            "config": None if config is None else _json_clean(config, "config"),
            "meta": _json_clean(dict(meta or {}), "meta"),
            "qgait_version": qgait.__version__, "state_dict": state}


def save_model(model: nn.Module, dest: str | os.PathLike | BinaryIO, meta: dict | None = None,
               *, config: dict | None = None) -> dict:
    """Writes ``model`` (fp, fake-quant or packed) as a model file; returns its header.

    Args:
        model: a model built by ``qgait.models.build_model``, optionally quantized
            (``quantize_`` / the QGait stages) and converted (``qgait.quant.convert``).
        dest: a path (written atomically) or a binary file object.
        meta: JSON data kept with the model (e.g. where it came from, its accuracy).
        config: the training config it came from (JSON), returned by ``load_model``.
    """
    payload = _payload(model, meta, config)
    if isinstance(dest, (str, os.PathLike)):
        atomic_save(payload, dest)
    else:
        torch.save(payload, dest)
    return {k: v for k, v in payload.items() if k != "state_dict"}


def model_to_bytes(model: nn.Module, meta: dict | None = None, *,
                   config: dict | None = None) -> bytes:
    """The bytes of :func:`save_model`'s file (``load_model`` reads them back)."""
    buf = io.BytesIO()
    save_model(model, buf, meta, config=config)
    return buf.getvalue()


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Writes a training checkpoint (the trainer's ``state_dict()``) atomically, tagged with
    the checkpoint format; everything in it must be plain data (see the module docstring)."""
    import qgait
    atomic_save({**state, "format": CHECKPOINT_FORMAT, "format_version": FORMAT_VERSION,
                 "qgait_version": qgait.__version__}, path)


# ----------------------------------------------------------------------------- reading
_TRUST_LEGACY = [False]


@contextlib.contextmanager
def trusting_legacy_files(on: bool = True):
    """Within the block, reads that do not pass ``trust_legacy`` use ``on`` (what
    ``--trust-legacy-file`` sets for a whole command)."""
    old = _TRUST_LEGACY[0]
    _TRUST_LEGACY[0] = bool(on)
    try:
        yield
    finally:
        _TRUST_LEGACY[0] = old


def _name(src) -> str:
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return "<model bytes>"
    return str(getattr(src, "name", "<model stream>"))


def _as_input(src):
    """A path stays a path (checked to exist); bytes and streams become a BytesIO."""
    if isinstance(src, (str, os.PathLike)):
        p = Path(src)
        if not p.exists():
            raise ModelFileError(f"{p}: no such file; give the path of a model or checkpoint "
                                 "(.pt) written by qgait")
        if p.is_dir():
            raise ModelFileError(f"{p}: is a folder; give a model or checkpoint file in it "
                                 "(e.g. final.pt or last.pt)")
        return p
    if isinstance(src, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(src))
    if hasattr(src, "read"):
        return io.BytesIO(src.read())
    raise TypeError(f"qgait.model_io: expected a path, bytes or a binary file, got "
                    f"{type(src).__name__}")


def _pickle_globals(data: bytes, limit: int = 8) -> list[str]:
    """The ``module.name`` globals a raw pickle would import, read from its opcodes (nothing
    is executed); best effort."""
    found: list[str] = []
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            if op.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
            if len(found) >= limit:
                break
    except Exception:  # noqa: BLE001 - a torn pickle: report what was seen
        pass
    return list(dict.fromkeys(found))


def _unsafe_globals(inp) -> list[str]:
    try:
        if isinstance(inp, io.BytesIO):
            inp.seek(0)
        if zipfile.is_zipfile(inp):
            if isinstance(inp, io.BytesIO):
                inp.seek(0)
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(inp))
        data = inp.getvalue() if isinstance(inp, io.BytesIO) else Path(inp).read_bytes()
        return _pickle_globals(data)
    except Exception:  # noqa: BLE001
        return []
    finally:
        if isinstance(inp, io.BytesIO):
            inp.seek(0)


def _torch_load(inp, weights_only: bool, map_location):
    if isinstance(inp, io.BytesIO):
        inp.seek(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "Detected pickle protocol 4 ..."
        return torch.load(inp, map_location=map_location, weights_only=weights_only)


def _read(src: Source, trust_legacy: bool | None, map_location="cpu") -> tuple[Any, str, bool]:
    """``(object, name, legacy)``: the file's top-level object, read with
    ``weights_only=True`` (or, for a refused file and ``trust_legacy``, with the full
    unpickler, ``legacy`` True)."""
    name = _name(src)
    inp = _as_input(src)
    trust = _TRUST_LEGACY[0] if trust_legacy is None else bool(trust_legacy)
    try:
        return _torch_load(inp, True, map_location), name, False
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Weights only load failed" not in text:
            raise ModelFileError(f"{name}: cannot read it ({_first_line(text)}); the file is "
                                 "truncated or not a model file written by qgait") from None
        unsafe = _unsafe_globals(inp)
        if "Unsupported operand" in text and not unsafe or "truncated" in text:
            raise ModelFileError(f"{name}: cannot read it (not a torch file, or truncated); "
                                 "give a model or checkpoint written by qgait") from None
        if not trust:
            what = ", ".join(unsafe[:4]) if unsafe else "Python objects"
            raise ModelFileError(
                f"{name}: refused: reading it would import {what}, i.e. run code from the file "
                f"(qgait model files hold only tensors and JSON). A file written by an older "
                f"qgait loads with {LEGACY_FLAG} (trust_legacy=True in Python); use it only "
                f"for a file you trust") from None
    except ModelFileError:
        raise
    except Exception as e:  # noqa: BLE001 - zip / EOF / key errors of a torn or foreign file
        text = str(e)
        why = ("an incomplete zip archive" if "zip archive" in text else
               "empty or cut short" if isinstance(e, EOFError) else
               f"{type(e).__name__}: {_first_line(text, 80)}")
        raise ModelFileError(f"{name}: cannot read it ({why}); the file is truncated or not a "
                             "model file written by qgait") from None
    print(f"qgait: warning: {name}: read with {LEGACY_FLAG} (a pickled file of an older qgait; "
          "unpickling it can run code)", file=sys.stderr)
    try:
        return _torch_load(inp, False, map_location), name, True
    except Exception as e:  # noqa: BLE001
        raise ModelFileError(f"{name}: cannot read it even as a legacy file ({type(e).__name__}: "
                             f"{_first_line(str(e))})") from None


def _first_line(s: str, n: int = 160) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 3] + "..."


def _not_qgait(name: str, obj) -> ModelFileError:
    what = (f"a dict with keys {sorted(map(str, obj))[:6]}" if isinstance(obj, dict)
            else f"a {type(obj).__name__}")
    return ModelFileError(f"{name}: not a qgait model or checkpoint (it holds {what}, no "
                          "'format' / 'config'); give a file written by qgait train, qgait "
                          "pipeline, qgait convert or qgait.model_io.save_model")


def _is_checkpoint(obj) -> bool:
    return (isinstance(obj, dict) and isinstance(obj.get("config"), dict)
            and isinstance(obj.get("model"), dict) and obj.get("format") != MODEL_FORMAT)


def _check_version(name: str, obj: dict) -> None:
    v = obj.get("format_version", 0)
    if not isinstance(v, int) or v > FORMAT_VERSION:
        raise ModelFileError(f"{name}: written by a newer qgait (file format {v!r}, this qgait "
                             f"reads up to {FORMAT_VERSION}); upgrade qgait")


def read_header(src: Source, *, trust_legacy: bool | None = None) -> dict:
    """What a model file or checkpoint says about itself, without building the model:
    ``{"file": "model" | "checkpoint" | "legacy-packed", "kind", "config", "meta", "step",
    "format_version", "qgait_version"}``."""
    obj, name, legacy = _read(src, trust_legacy)
    return _info(name, obj, legacy)


def _info(name: str, obj, legacy: bool) -> dict:
    if isinstance(obj, dict) and obj.get("format") == MODEL_FORMAT:
        _check_version(name, obj)
        kind = obj.get("kind")
        if kind not in KINDS:
            raise ModelFileError(f"{name}: unknown model kind {kind!r} (expected one of {KINDS})")
        return {"file": "model", "kind": kind, "config": obj.get("config"),
                "meta": obj.get("meta") or {}, "step": (obj.get("meta") or {}).get("step"),
                "format_version": obj["format_version"],
                "qgait_version": obj.get("qgait_version"), "source": name, "legacy": legacy}
    if isinstance(obj, dict) and obj.get("format") == LEGACY_PACKED_FORMAT and legacy:
        return {"file": "legacy-packed", "kind": "packed", "config": obj.get("config"),
                "meta": {}, "step": None, "format_version": 0, "qgait_version": None,
                "source": name, "legacy": True}
    if _is_checkpoint(obj):
        _check_version(name, obj)
        stage = obj.get("stage", obj["config"].get("stage", "fp"))
        step = obj.get("step")
        return {"file": "checkpoint", "kind": "fp" if stage == "fp" else "fakequant",
                "stage": stage, "config": obj["config"], "meta": {},
                "step": int(step) if isinstance(step, (int, float)) else None,
                "format_version": obj.get("format_version", 0),
                "qgait_version": obj.get("qgait_version"), "source": name, "legacy": legacy}
    if legacy and isinstance(obj, nn.Module):
        return {"file": "legacy-module", "kind": None, "config": None, "meta": {}, "step": None,
                "format_version": 0, "qgait_version": None, "source": name, "legacy": True}
    raise _not_qgait(name, obj)


# ----------------------------------------------------------------------------- rebuilding
def _build_arch(name: str, arch) -> nn.Module:
    from qgait.models import build_model
    if not isinstance(arch, dict):
        raise ModelFileError(f"{name}: 'arch' is not a mapping; the file is damaged")
    a = dict(arch)
    if isinstance(a.get("bins"), list):
        a["bins"] = tuple(a["bins"])
    try:
        return build_model(**a)
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"{name}: cannot build the model it describes ({e})") from None


def _build_from_payload(name: str, obj: dict) -> nn.Module:
    from qgait.quant import QuantConfig, quantize_
    from qgait.quant.convert import convert
    soft, PackedConv3d, PackedPartLinear = _quant_classes()
    model = _build_arch(name, obj.get("arch"))
    layers = obj.get("layers") or {}
    if not isinstance(layers, dict):
        raise ModelFileError(f"{name}: 'layers' is not a mapping; the file is damaged")
    for fqn, rec in layers.items():
        try:
            cfg = QuantConfig(w_bits=rec["w_bits"], a_bits=rec["a_bits"])
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFileError(f"{name}: layer {fqn!r}: bad quantization record ({e})") from None
        quantize_(model, cfg, filter_fn=lambda m, f, want=fqn: f == want)
        try:
            layer = model.get_submodule(fqn)
        except AttributeError:
            layer = None
        if not isinstance(layer, soft):
            raise ModelFileError(f"{name}: layer {fqn!r} is not a quantizable layer of the "
                                 "model described; the file is damaged")
    if obj["kind"] == "packed":
        for fqn, rec in layers.items():
            layer = model.get_submodule(fqn)
            layer._a_signed = bool(rec.get("a_signed", False))
            layer.a_signed_flag.fill_(int(layer._a_signed))
            layer.initialized.fill_(True)
        convert(model, requantize=bool(obj.get("requantize", True)))
        for fqn, rec in layers.items():
            layer = model.get_submodule(fqn)
            got = {k: getattr(layer, k if k != "out_quant" else "out_scale")
                   for k in rec if k not in ("type", "w_bits", "a_bits")}
            if "out_quant" in got:
                got["out_quant"] = got["out_quant"] is not None
            want = {k: rec[k] for k in got}
            if type(layer).__name__ != rec.get("type") or got != want:
                raise ModelFileError(f"{name}: layer {fqn!r} rebuilds as {type(layer).__name__} "
                                     f"{got}, the file says {rec}; the file is damaged")
    sd = obj.get("state_dict")
    if not isinstance(sd, dict):
        raise ModelFileError(f"{name}: no 'state_dict'; the file is damaged")
    try:
        model.load_state_dict(sd)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise ModelFileError(f"{name}: its weights do not fit the model it describes "
                             f"({_first_line(str(e))})") from None
    return model.eval()


def _model_from_checkpoint(name: str, ck: dict) -> nn.Module:
    from qgait.pipeline.stages import checkpoint_prepare
    from qgait.train.trainer import STAGES
    cfg = ck["config"]
    stage = ck.get("stage", cfg.get("stage", "fp"))
    if stage not in STAGES:
        raise ModelFileError(f"{name}: stage {stage!r} is unknown to this qgait "
                             f"(known: {sorted(STAGES)})")
    m = cfg.get("model") or {}
    sd = ck["model"]
    num_classes = sd["head.weight"].shape[-1] if "head.weight" in sd else 0
    try:
        from qgait.models import build_model
        model = build_model(m["name"], num_classes=num_classes, width=m["width"],
                            embed_dim=m["embed_dim"], bins=tuple(m["bins"]), scale=m["scale"])
        model = STAGES[stage].prepare(model, checkpoint_prepare(cfg))
        model.load_state_dict(sd)
    except (KeyError, TypeError) as e:
        raise ModelFileError(f"{name}: its config does not describe a model ({type(e).__name__}"
                             f": {e}); the file is damaged") from None
    except (RuntimeError, ValueError) as e:
        raise ModelFileError(f"{name}: its weights do not fit the model its config describes "
                             f"({_first_line(str(e))})") from None
    return model.eval()


def load_model(src: Source, *, trust_legacy: bool | None = None) -> tuple[nn.Module, dict]:
    """``(model in eval mode on the CPU, info)`` from a model file or a training checkpoint.

    Args:
        src: a path, the file's bytes, or a binary file object.
        trust_legacy: read a file of an older qgait (a pickled module or checkpoint) with the
            full unpickler; only for files you trust. None: what :func:`trusting_legacy_files`
            set (False by default).

    ``info``: ``file`` ("model", "checkpoint", or "legacy-..."), ``kind`` ("fp",
    "fakequant", "packed"), ``config`` (training config or None), ``meta`` (what
    :func:`save_model` was given), ``step``, ``format_version``, ``qgait_version``, ``source``.

    Raises:
        ModelFileError: the file is missing, unreadable, not a qgait file, or would run code.
    """
    obj, name, legacy = _read(src, trust_legacy)
    info = _info(name, obj, legacy)
    if info["file"] == "model":
        model = _build_from_payload(name, obj)
    elif info["file"] == "checkpoint":
        model = _model_from_checkpoint(name, obj)
    elif info["file"] == "legacy-packed":
        model = obj["model"]
        if not isinstance(model, nn.Module):
            raise ModelFileError(f"{name}: a legacy packed file without a model")
        model = _legacy_arch(model.eval(), info["config"])
    else:   # a whole pickled module (trusted)
        model = obj.eval()
    if info["kind"] is None:
        try:
            info["kind"] = describe_model(model)["kind"]
        except TypeError:
            info["kind"] = "fp"
    return model, info


def _legacy_arch(model: nn.Module, cfg: dict | None) -> nn.Module:
    """A GaitLite3D unpickled from a qgait 0.1 file has no ``.arch``: derive it from the
    file's config and the model, so that ``save_model`` can write it in the current format."""
    m = (cfg or {}).get("model") or {}
    if getattr(model, "arch", None) is None and type(model).__name__ == "GaitLite3D" and m:
        h, w = getattr(model, "input_hw", (64, 44))
        model.arch = {"name": "GaitLite3D", "num_classes": int(model.num_classes),
                      "width": float(m["width"]), "embed_dim": m.get("embed_dim"),
                      "bins": [int(b) for b in model.bins], "scale": float(m.get("scale", 16.0)),
                      "height": int(h), "width_px": int(w)}
    return model


def load_checkpoint(src: Source, *, trust_legacy: bool | None = None,
                    map_location="cpu") -> dict:
    """A training checkpoint's dict (for resuming), checked to be one."""
    obj, name, legacy = _read(src, trust_legacy, map_location)
    if isinstance(obj, dict) and obj.get("format") == MODEL_FORMAT:
        raise ModelFileError(f"{name}: is a model file, not a training checkpoint; resume "
                             "from the run's last.pt")
    if not _is_checkpoint(obj):
        raise _not_qgait(name, obj)
    _check_version(name, obj)
    rng = obj.get("rng")
    if legacy and isinstance(rng, dict) and isinstance(rng.get("numpy"), tuple):
        # qgait 0.1 kept numpy's state tuple: store it the current way (tensors, numbers)
        import numpy as np
        nm, keys, pos, has_gauss, cached = rng["numpy"]
        rng["numpy"] = {"name": str(nm), "keys": torch.from_numpy(np.asarray(keys, np.int64)),
                        "pos": int(pos), "has_gauss": int(has_gauss),
                        "cached_gaussian": float(cached)}
    return obj


def upgrade_file(src: str | os.PathLike, dest: str | os.PathLike) -> str:
    """Re-writes a file of an older qgait (read with the full unpickler: only for files you
    trust) in the current format: a checkpoint stays a checkpoint, a packed or whole-module
    file becomes a model file. Returns what was written ("checkpoint" or "model")."""
    obj, name, legacy = _read(src, True)
    info = _info(name, obj, legacy)
    if info["file"] == "checkpoint":
        ck = load_checkpoint(src, trust_legacy=True)
        save_checkpoint({k: v for k, v in ck.items()
                         if k not in ("format", "format_version", "qgait_version")}, dest)
        return "checkpoint"
    model, info = load_model(src, trust_legacy=True)
    save_model(model, dest, info["meta"], config=info["config"])
    return "model"


def load_weights(src: Source, *, trust_legacy: bool | None = None) -> tuple[dict, str]:
    """``(state_dict, kind)`` of a checkpoint or model file to start training from (kind "fp"
    or "fakequant"); a plain state dict saved with ``torch.save`` is read as "fp"."""
    obj, name, legacy = _read(src, trust_legacy)
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()) \
            and all(isinstance(k, str) for k in obj):
        return obj, "fp"
    info = _info(name, obj, legacy)
    if info["file"] == "checkpoint":
        return obj["model"], info["kind"]
    if info["file"] == "model":
        if info["kind"] == "packed":
            raise ModelFileError(f"{name}: a packed (converted) model cannot start training; "
                                 "give its fp or fake-quant checkpoint")
        return obj["state_dict"], info["kind"]
    raise ModelFileError(f"{name}: a legacy {info['file']} cannot start training; give a "
                         "checkpoint")


def load_checkpoint_model(src: Source, *, trust_legacy: bool | None = None
                          ) -> tuple[nn.Module, dict]:
    """``(model, training config)`` of a checkpoint or a model file that carries its config
    (stage preparation applied, weights loaded, eval mode)."""
    model, info = load_model(src, trust_legacy=trust_legacy)
    cfg = info["config"]
    if cfg is None:
        raise ModelFileError(f"{info['source']}: holds no training config; give the training "
                             "checkpoint it came from")
    return model, cfg


def load_any(path: str | os.PathLike, *, trust_legacy: bool | None = None):
    """A model file, a checkpoint, an ONNX model (qgait export-onnx) or a shipped model
    (``"zoo:NAME"``, :mod:`qgait.zoo`) -> ``(callable with (x, seqL) -> {"embeddings"},
    info)``; ONNX files are read by onnxruntime (no pickle)."""
    from qgait import zoo
    if zoo.is_zoo_name(path):
        return zoo.load(path)
    if str(path).endswith(".onnx"):
        if not Path(path).is_file():
            raise ModelFileError(f"{path}: no such file; give an .onnx file written by qgait "
                                 "export-onnx")
        from qgait.export import OnnxEmbedder
        try:
            emb = OnnxEmbedder(path)
        except Exception as e:  # noqa: BLE001 - onnxruntime's own errors
            raise ModelFileError(f"{path}: onnxruntime cannot load it ({_first_line(str(e))})"
                                 ) from None
        return ((lambda x, seqL=None: {"embeddings": emb(x, seqL)}),
                {"file": "onnx", "kind": "onnx", "config": None, "meta": {}, "step": None,
                 "source": str(path)})
    return load_model(path, trust_legacy=trust_legacy)
