"""Models shipped inside the package: ``qgait.zoo.load(NAME)``, ``zoo:NAME`` on the command line.

The zoo is a folder (this package's by default) holding ``index.json`` and, per model, a model
file written by :func:`qgait.model_io.save_model` (``NAME.qgm``: tensors and JSON, read with
``weights_only=True``, never a pickle of code), a model card (``NAME.md``) and a reference
embedding (``NAME.ref.pt``: one tensor) of :func:`reference_sequence`. ``index.json`` records
each file's SHA-256; :func:`load` checks the model file against it before reading anything, so
a damaged or swapped file is refused with one line naming it.

Release models are added by :func:`add` (``python -m qgait.zoo add NAME MODEL_FILE --card
CARD.md``), which computes the checksum and records the reference embedding on the machine
that adds it. ``python -m qgait.zoo verify`` re-checks every shipped model: its checksum, that
it loads without the legacy unpickler, and that it reproduces its reference embedding.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from qgait.errors import UserError

ZOO_DIR = Path(__file__).resolve().parent
PREFIX = "zoo:"
# The reference embedding's tolerance, relative to its largest magnitude: the largest
# difference at most REF_RTOL, the mean at most REF_MEAN_RTOL. fp32 convolutions differ by a
# few ulps between CPUs (oneDNN's kernels per vendor and class) and thread counts; in a
# fake-quant model an ulp can move an activation across a rounding boundary, which the next
# layers carry on: casiab-lite3d-w8a8-ptq, recorded on an AMD EPYC (Zen 4), differs by 2.3e-3
# at most (2.6e-3 with oneDNN capped to AVX2), 2.1e-4 on average, on an Intel Xeon with AMX;
# the other shipped models by under 1e-6. A wrong or damaged model is off by orders of
# magnitude more (and its file fails its checksum first).
REF_RTOL = 1e-2
REF_MEAN_RTOL = 1e-3

__all__ = ["PREFIX", "ZOO_DIR", "ZooError", "add", "card", "is_zoo_name", "list_models",
           "load", "path", "reference_embedding", "reference_sequence", "verify"]


class ZooError(UserError, ValueError):
    """A zoo name that is not there, or a shipped file that fails its checksum."""


def _dir(zoo_dir) -> Path:
    return Path(zoo_dir) if zoo_dir is not None else Path(os.environ.get("QGAIT_ZOO_DIR",
                                                                          ZOO_DIR))


def _index(zoo_dir=None) -> dict:
    p = _dir(zoo_dir) / "index.json"
    if not p.exists():
        return {"models": {}}
    return json.loads(p.read_text())


def is_zoo_name(src) -> bool:
    return isinstance(src, str) and src.startswith(PREFIX)


def list_models(zoo_dir=None) -> list[str]:
    """Names of the shipped models."""
    return sorted(_index(zoo_dir)["models"])


def _entry(name: str, zoo_dir=None) -> dict:
    name = name[len(PREFIX):] if is_zoo_name(name) else name
    models = _index(zoo_dir)["models"]
    if name not in models:
        have = ", ".join(sorted(models)) or "none shipped in this version"
        raise ZooError(f"zoo:{name}: no such model in {_dir(zoo_dir)} (available: {have}); "
                       "`python -m qgait.zoo list` shows them")
    return {"name": name, **models[name]}


def path(name: str, zoo_dir=None) -> Path:
    """The model file of ``name`` (checked against its recorded SHA-256)."""
    from qgait.model_io import file_sha256
    e = _entry(name, zoo_dir)
    p = _dir(zoo_dir) / e["file"]
    if not p.is_file():
        raise ZooError(f"zoo:{e['name']}: its file {p} is missing; reinstall qgait")
    got = file_sha256(p)
    if got != e["sha256"]:
        raise ZooError(f"zoo:{e['name']}: {p} has SHA-256 {got[:16]}..., the index records "
                       f"{e['sha256'][:16]}...: the file is damaged or replaced; reinstall qgait")
    return p


def load(name: str, zoo_dir=None):
    """``(model in eval mode on the CPU, info)`` of a shipped model (see
    :func:`qgait.model_io.load_model`); ``info["zoo"]`` is its index entry."""
    from qgait.model_io import load_model
    p = path(name, zoo_dir)
    model, info = load_model(p, trust_legacy=False)
    info["zoo"] = _entry(name, zoo_dir)
    return model, info


def card(name: str, zoo_dir=None) -> str:
    """The model card (markdown) of ``name``."""
    e = _entry(name, zoo_dir)
    return (_dir(zoo_dir) / e["card"]).read_text()


def reference_sequence() -> torch.Tensor:
    """The fixed input each shipped model's reference embedding is recorded on: a synthetic
    walker (qgait.data.synthetic, seed 0, subject 1, nm-01, view 090, 40 frames, no noise),
    binarised and cropped to 64 x 44: ``[1, 1, 40, 64, 44]`` float32 of 0 / 1."""
    from qgait.data.synthetic import generate_sequence
    f = generate_sequence(0, 0, "nm-01", "090", frames=(40, 40), noise=False)
    return torch.from_numpy((f[:, :, 10:54] > 127).astype(np.float32))[None, None]


def reference_embedding(model) -> torch.Tensor:
    """``model``'s embedding ``[C, P]`` of :func:`reference_sequence` (fp32, no autocast)."""
    with torch.inference_mode():
        return model(reference_sequence())["embeddings"][0].float().cpu()


def add(name: str, model_file, card_file, zoo_dir=None) -> dict:
    """Copies a model file (:func:`qgait.model_io.save_model` format) and its card into the
    zoo, records its checksum and reference embedding; returns the index entry."""
    import shutil

    from qgait.model_io import atomic_save, atomic_write_text, file_sha256, load_model
    if not name.replace("-", "").replace("_", "").isalnum():
        raise ZooError(f"zoo name {name!r}: use letters, digits, - and _")
    d = _dir(zoo_dir)
    d.mkdir(parents=True, exist_ok=True)
    model, info = load_model(model_file, trust_legacy=False)
    if info["file"] != "model":
        raise ZooError(f"{model_file}: is a {info['file']}, not a model file; write one with "
                       "qgait convert (packed) or qgait.model_io.save_model")
    dst = d / f"{name}.qgm"
    shutil.copyfile(model_file, dst)
    shutil.copyfile(card_file, d / f"{name}.md")
    ref = reference_embedding(model)
    atomic_save(ref, d / f"{name}.ref.pt")
    entry = {"file": dst.name, "sha256": file_sha256(dst), "bytes": dst.stat().st_size,
             "kind": info["kind"], "card": f"{name}.md", "reference": f"{name}.ref.pt",
             "reference_sha256": file_sha256(d / f"{name}.ref.pt")}
    idx = _index(d)
    idx["models"][name] = entry
    atomic_write_text(d / "index.json", json.dumps(idx, indent=2, sort_keys=True) + "\n")
    return {"name": name, **entry}


def verify(name: str, zoo_dir=None) -> dict:
    """Checks a shipped model: checksums, a safe load, and its reference embedding reproduced
    within ``REF_RTOL`` at most and ``REF_MEAN_RTOL`` on average (relative to the embedding's
    largest magnitude). Returns the numbers;
    raises :class:`ZooError` on a mismatch."""
    from qgait.model_io import file_sha256
    e = _entry(name, zoo_dir)
    d = _dir(zoo_dir)
    model, info = load(name, zoo_dir)
    ref_path = d / e["reference"]
    if file_sha256(ref_path) != e["reference_sha256"]:
        raise ZooError(f"zoo:{name}: {ref_path} fails its checksum; reinstall qgait")
    ref = torch.load(ref_path, map_location="cpu", weights_only=True)
    got = reference_embedding(model)
    if got.shape != ref.shape:
        raise ZooError(f"zoo:{name}: embedding shape {tuple(got.shape)}, recorded "
                       f"{tuple(ref.shape)}")
    scale = ref.abs().max().clamp_min(1e-12)
    rel = float((got - ref).abs().max() / scale)
    mean = float((got - ref).abs().mean() / scale)
    if not (rel <= REF_RTOL and mean <= REF_MEAN_RTOL):
        raise ZooError(f"zoo:{name}: the reference embedding differs by {rel:.2e} at most and "
                       f"{mean:.2e} on average (relative), more than {REF_RTOL:g} / "
                       f"{REF_MEAN_RTOL:g}")
    return {"name": name, "kind": info["kind"], "max_rel_diff": rel, "mean_rel_diff": mean,
            "bytes": e["bytes"]}
