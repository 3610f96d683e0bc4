"""Evaluations cached next to a model file, keyed by everything that produced them.

An entry is reused only when its key matches exactly: the model file's SHA-256 (its content,
not its path), the evaluation's arguments (protocol, frames per batch, how the model ran: fp32
or packed, ...), a fingerprint of the test set (its files' paths, sizes and times) and the
qgait version. Entries live in ``<model>.evals.json`` as ``{"entries": {digest: {"key": ...,
"result": ...}}}`` (written atomically), so evaluations of one checkpoint under other settings
sit side by side instead of replacing each other.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def cache_path(model_path: str | os.PathLike) -> Path:
    p = Path(model_path)
    return p.with_name(p.name + ".evals.json")


def dataset_fingerprint(dataset) -> dict:
    """``{"n_sequences", "sha256"}`` of a dataset's labels and file contents. Contents, not
    paths or times: a tree copied, moved or provisioned again keeps its cached evaluations,
    a changed file does not (hashing CASIA-B's 2,629 dev test files, 80 MB, takes ~0.2 s)."""
    h = hashlib.sha256()
    for q in dataset.seqs:
        try:
            with open(q.path, "rb") as f:
                stamp = hashlib.file_digest(f, "sha256").hexdigest()
        except OSError:
            stamp = "?"
        h.update(f"{q.subject}|{q.condition}|{q.view}|{stamp}\n".encode())
    return {"n_sequences": len(dataset.seqs), "sha256": h.hexdigest()}


def evaluation_key(model_path: str | os.PathLike, **fields) -> dict:
    """The key of an evaluation of ``model_path``: its content hash, the qgait version and
    ``fields`` (JSON values: the evaluation's arguments and the data fingerprint)."""
    import qgait
    from qgait.model_io import file_sha256
    return json.loads(json.dumps({"model_sha256": file_sha256(model_path),
                                  "qgait_version": qgait.__version__, **fields},
                                 sort_keys=True))


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _entries(model_path) -> dict:
    p = cache_path(model_path)
    try:
        data = json.loads(p.read_text())
        return data["entries"] if isinstance(data.get("entries"), dict) else {}
    except (OSError, ValueError, AttributeError):
        return {}


def lookup(model_path: str | os.PathLike, key: dict) -> dict | None:
    """The cached result of ``key`` (None when absent or when the stored key differs)."""
    e = _entries(model_path).get(_digest(key))
    if isinstance(e, dict) and e.get("key") == key:
        return e.get("result")
    return None


def store(model_path: str | os.PathLike, key: dict, result: dict) -> None:
    """Adds (or replaces) the entry of ``key``, keeping the others."""
    from qgait.model_io import atomic_write_text
    entries = _entries(model_path)
    entries[_digest(key)] = {"key": key, "result": result}
    atomic_write_text(cache_path(model_path), json.dumps({"entries": entries}, indent=1))
