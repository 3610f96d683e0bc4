"""Training configs: YAML files with defaults, dotted ``--key value`` overrides, validation.

A config is a nested dict. :data:`DEFAULTS` holds every key the trainer reads; a YAML file
(``qgait/configs/<name>.yaml`` or any path) overrides some, and command-line overrides
(``--optim.lr 0.05``) override those. Unknown keys are an error (a typo would otherwise be
silently ignored), except below ``extra`` which later stages may use freely. A YAML file may
name another config as its ``base:`` and hold only what differs from it.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Sequence

import yaml

from qgait.errors import ConfigError, ConfigNotFoundError


class _Loader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, except that a zero-padded number stays a string: subject ids
    such as ``074`` would otherwise be octal (074 -> 60, 050 -> 40) and silently pick other
    subjects."""


def _int_or_padded(loader, node):
    text = loader.construct_scalar(node)
    digits = text.lstrip("+-")
    if len(digits) > 1 and digits[0] == "0" and digits[1] in "0123456789_":
        return text
    return yaml.SafeLoader.construct_yaml_int(loader, node)


_Loader.add_constructor("tag:yaml.org,2002:int", _int_or_padded)


def _yaml(text):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

DEFAULTS: dict[str, Any] = {
    "name": "run",
    "stage": "fp",                    # "fp" now; the next issue adds "qat" and "soft"
    "seed": 0,
    "data": {
        "root": "../shared/data/casia-b/pkl",
        "train_ids": ["001", "050"],  # inclusive id range
        "test_ids": ["051", "074"],
        "synthetic": None,            # synthetic.generate() kwargs: generate if root is empty
        "P": 8, "K": 8,
        "frames": 30,
        "sampling": "ordered",        # "ordered": a contiguous clip; "unordered": random frames
        "prefetch": 6,                # batches prepared ahead by the background thread
        # per-sequence augmentation (qgait.data.augment.SilhouetteAugment): probabilities of
        # a left-right flip, a small similarity warp and an erased rectangle; 0 = off
        "augment": {"flip": 0.0, "affine": 0.0, "rotate": 10.0, "scale": 0.1, "shift": 0.05,
                    "erase": 0.0, "erase_area": [0.02, 0.1]},
    },
    "model": {"name": "GaitLite3D", "width": 1.0, "embed_dim": None,
              "bins": [16, 8, 4, 2, 1], "scale": 16.0},
    "loss": {"triplet_margin": 0.2, "triplet_weight": 1.0,
             "ce_weight": 1.0, "label_smoothing": 0.1},
    "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
              "nesterov": True, "betas": [0.9, 0.999]},
    "sched": {"name": "cosine", "warmup": 100, "milestones": [], "gamma": 0.1,
              "min_lr_ratio": 0.01},
    "train": {"iterations": 1000, "amp": "auto", "channels_last": "auto",
              "log_every": 10, "ckpt_every": 200, "keep_every": 0,
              "out_dir": "runs/{name}", "threads": 0, "progress": True,
              "init_from": None,   # weights to start a new run from (QAT pipeline: quant.*)
              # a wall-time budget: after budget_calibration steps the run's length is set to
              # what the measured step time fits into the budget (at most train.iterations)
              "budget_minutes": None, "budget_calibration": 30},
    "eval": {"max_frames": 720, "metric": "euc"},
    # QGait stages "qat" (stage 1) and "soft" (stage 2); see qgait/pipeline/stages.py
    "quant": {
        "w_bits": 4, "a_bits": 4,
        "binary_input": ["stem.0"],    # layers whose input is the binary silhouette: not quantized
        "keep_8bit": ["stem", "fc"],   # module prefixes kept at W8A8 (first conv, per-part FCs)
        "init_from": None,             # checkpoint to start from (fp, or a quantized stage)
        "teacher": None,               # fp checkpoint: IDC's full-precision teacher (soft stage)
        "k0": 1.0, "k1": 6.0,          # soft stage: temperature, linear from k0 to k1
        "mode": "hard",                # soft stage forward: "hard" (QGait) or "soft" (sigma)
        "idc_weight": 1.0, "idc_beta": 1.0,
        "step_lr_mult": 0.1,           # learning-rate multiplier of the quantizer steps
        "w_init": "lsq",               # weight steps from LSQ's rule, or "mse" (QuantConfig)
        "a_init": "mse",               # activation steps: least squared error, "max" or "pct"
    },
    # qgait pipeline: per-stage overrides and the variants to build (qgait/pipeline/run.py)
    "pipeline": {"fp": {}, "qat": {}, "soft": {}, "variants": ["w8a8", "w4a4"]},
    "extra": {},
}

_CHOICES = {
    ("stage",): ("fp", "qat", "soft"),
    ("data", "sampling"): ("ordered", "unordered"),
    ("optim", "name"): ("sgd", "adamw"),
    ("sched", "name"): ("cosine", "step", "constant"),
    ("quant", "w_init"): ("lsq", "mse"),   # qgait.nn.soft_quant.W_INITS (kept torch-free)
    ("quant", "a_init"): ("mse", "max", "pct"),   # qgait.nn.soft_quant.A_INITS
    ("train", "amp"): ("auto", "none", "bf16", "fp16"),
    ("train", "channels_last"): ("auto", True, False),
}


def _suggest(key: str, known, path: str = "") -> str:
    import difflib
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f"did you mean {path + close[0]!r}? " if close else ""


def _merge(base: dict, over: dict, path: str = "", prefix: str = "") -> dict:
    """``over`` merged into a copy of ``base``; an unknown key is a :class:`ConfigError`
    (below ``extra`` and ``pipeline`` anything goes; :func:`validate` checks ``pipeline``).
    ``prefix`` is put before the key in messages (e.g. ``pipeline.qat.``)."""
    if over is not None and not isinstance(over, dict):
        raise ConfigError(f"config: {(prefix + path).rstrip('.') or 'the config'} must be a "
                          f"mapping, got {over!r}")
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        key = f"{path}{k}"
        if k not in base and not path.startswith(("extra", "pipeline")):
            hint = _suggest(str(k), base, prefix + path)
            raise ConfigError(f"config: unknown key {prefix + key!r} "
                              f"({hint}known: {', '.join(sorted(base))})")
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            out[k] = _merge(base[k], v, key + ".", prefix)
        else:
            out[k] = copy.deepcopy(v)
    return out


def resolve_config_path(name_or_path: str) -> Path:
    """``"casia_b_fp"`` -> the packaged ``qgait/configs/casia_b_fp.yaml``; a path stays a path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    q = CONFIG_DIR / f"{name_or_path}.yaml"
    if q.exists():
        return q
    known = sorted(f.stem for f in CONFIG_DIR.glob("*.yaml"))
    raise ConfigNotFoundError(f"config {name_or_path!r}: no such file, and not one of {known}; "
                              "give a packaged config name or a .yaml path")


def parse_overrides(args: Sequence[str]) -> dict:
    """``["--optim.lr", "0.05", "--train.amp=none"]`` -> ``{"optim": {"lr": 0.05}, ...}``.

    Values are parsed as YAML (numbers, booleans, lists like ``[001, 050]`` stay typed).
    """
    out: dict = {}
    it = list(args)
    i = 0
    while i < len(it):
        a = it[i]
        if not a.startswith("--"):
            raise ConfigError(f"override {a!r}: expected --dotted.key value (e.g. --optim.lr "
                              "0.05)")
        if "=" in a:
            key, val = a[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(it):
                raise ConfigError(f"override {a!r} has no value (e.g. {a} 0.05)")
            key, val = a[2:], it[i + 1]
            i += 2
        d = out
        parts = key.split(".")
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        try:
            d[parts[-1]] = _yaml(val) if val != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override --{key}: cannot parse {val!r} "
                              f"({' '.join(str(e).split())})") from None
    return out


def _check_types(cfg: dict, defaults: dict, path: str = "") -> None:
    """A number where the default is a number (or None), a bool where it is a bool."""
    for k, dv in defaults.items():
        if k not in cfg or k == "extra":
            continue
        v, key = cfg[k], f"{path}{k}"
        if isinstance(dv, dict) and isinstance(v, dict):
            _check_types(v, dv, key + ".")
        elif isinstance(dv, bool):
            if not isinstance(v, bool):
                raise ConfigError(f"config: {key} must be true or false, got {v!r}")
        elif isinstance(dv, (int, float)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ConfigError(f"config: {key} must be a number, got {v!r}")


_PIPELINE_KEYS = ("fp", "qat", "soft", "variants")


def _validate_pipeline(cfg: dict) -> None:
    """Every ``pipeline.<stage>`` override applied to the config must be a valid config, and
    ``pipeline.variants`` known variant names: checked at load, not when the stage starts."""
    pipe = cfg.get("pipeline")
    if pipe is None:
        return
    if not isinstance(pipe, dict):
        raise ConfigError(f"config: pipeline must be a mapping, got {pipe!r}")
    for k in pipe:
        if k not in _PIPELINE_KEYS:
            hint = _suggest(str(k), _PIPELINE_KEYS, "pipeline.")
            raise ConfigError(f"config: unknown key 'pipeline.{k}' ({hint}known: "
                              f"{', '.join(_PIPELINE_KEYS)})")
    base = {k: v for k, v in cfg.items() if k != "pipeline"}
    for stage in ("fp", "qat", "soft"):
        over = pipe.get(stage) or {}
        merged = _merge(base, over, prefix=f"pipeline.{stage}.")
        merged["stage"] = stage
        try:
            validate(merged, _pipeline=False)
        except ConfigError as e:
            raise ConfigError(str(e).replace("config: ", f"config: pipeline.{stage}: ", 1)) \
                from None
    variants = pipe.get("variants")
    if variants is not None:
        from qgait.pipeline.run import variant
        if not isinstance(variants, (list, tuple)):
            raise ConfigError(f"config: pipeline.variants must be a list, got {variants!r}")
        for v in variants:
            try:
                variant(str(v))
            except ValueError as e:
                raise ConfigError(f"config: pipeline.variants: {e}") from None


def validate(cfg: dict, _pipeline: bool = True) -> dict:
    """Checks values (choices, types, ranges) and, with ``pipeline``, every pipeline stage's
    config; raises :class:`ConfigError` naming the key."""
    _check_types(cfg, DEFAULTS)
    for path, choices in _CHOICES.items():
        v = cfg
        for p in path:
            v = v[p]
        if v not in choices:
            raise ConfigError(f"config: {'.'.join(path)} = {v!r}, expected one of {choices}")
    d, t = cfg["data"], cfg["train"]
    for k in ("P", "K", "frames"):
        if not isinstance(d[k], int) or d[k] < 1:
            raise ConfigError(f"config: data.{k} must be a positive int, got {d[k]!r}")
    from qgait.data.augment import SilhouetteAugment
    try:
        SilhouetteAugment.from_config(d["augment"])   # raises on a bad probability or range
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config: data.augment: {e}") from None
    if d["K"] < 2:
        raise ConfigError("config: data.K must be >= 2 (a triplet needs a positive)")
    if not isinstance(t["iterations"], int) or t["iterations"] < 0:
        raise ConfigError(f"config: train.iterations must be an int >= 0, got {t['iterations']!r}")
    if t["budget_minutes"] is not None:
        cal, warm = t["budget_calibration"], cfg["sched"]["warmup"]
        if t["budget_minutes"] <= 0 or not isinstance(cal, int) or cal < 3:
            raise ConfigError("config: train.budget_minutes must be > 0 and "
                              "train.budget_calibration an int >= 3")
        if warm <= cal:
            raise ConfigError(f"config: train.budget_minutes needs sched.warmup ({warm}) > "
                              f"train.budget_calibration ({cal}): the run's length is only "
                              "known after the calibration steps, which must not depend on it")
    lr = cfg["optim"]["lr"]
    if not isinstance(lr, (int, float)) or lr <= 0:
        raise ConfigError(f"config: optim.lr must be > 0, got {cfg['optim']['lr']}")
    for k in ("train_ids", "test_ids"):
        v = d[k]
        if v is not None and not (isinstance(v, (list, tuple)) and len(v) == 2):
            raise ConfigError(f"config: data.{k} must be [first, last], got {v!r}")
        if v is not None:
            d[k] = [f"{int(s):03d}" if isinstance(s, int) else str(s) for s in v]
    if _pipeline:
        _validate_pipeline(cfg)
    return cfg


def _load_yaml(name_or_path: str, chain: tuple[str, ...] = ()) -> list[dict]:
    """The YAML mappings of a config and its ``base:`` ancestors, oldest first."""
    path = resolve_config_path(name_or_path).resolve()
    if str(path) in chain:
        raise ConfigError(f"config: 'base' cycle: {' -> '.join(chain + (str(path),))}")
    try:
        with open(path) as f:
            d = _yaml(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"config {path}: expected a mapping at the top level")
    base = d.pop("base", None)
    if base is None:
        return [d]
    # a relative base path is relative to the file naming it; a bare name is a packaged config
    b = Path(str(base))
    if b.suffix in (".yaml", ".yml") and not b.is_absolute():
        b = path.parent / b
    return _load_yaml(str(b), chain + (str(path),)) + [d]


def load_config(name_or_path: str | None = None,
                overrides: dict | Sequence[str] | None = None) -> dict:
    """Defaults <- YAML file (after its ``base:`` chain) <- overrides, validated.

    ``out_dir``'s ``{name}`` is filled in.
    """
    cfg = copy.deepcopy(DEFAULTS)
    if name_or_path:
        for d in _load_yaml(name_or_path):
            cfg = _merge(cfg, d)
    if overrides:
        if not isinstance(overrides, dict):
            overrides = parse_overrides(overrides)
        cfg = _merge(cfg, overrides)
    cfg = validate(cfg)
    out = str(cfg["train"]["out_dir"]).format(name=cfg["name"])
    cfg["train"]["out_dir"] = os.path.expanduser(out)
    return cfg
