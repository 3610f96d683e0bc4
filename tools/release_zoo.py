"""Builds qgait's release models from finished runs and adds them to the zoo (qgait/zoo/).

    python tools/release_zoo.py --fp runs/casia_b11_fp_w1_release/last.pt \
        --quant runs/b11_qgait_w1_release --dev-report runs/b11_qgait_w1_dev/report.json

For the teacher and each quantized variant (w8a8, w4a4: ``<quant>/<variant>/soft/final.pt``) it
writes model files without the training-only classifier (fp32, fake-quant and, for the
variants, the packed integer model of ``convert``), measures CPU latency per 30-frame sequence
on this CPU and on the AVX2 class (capped: QGAIT_CPU_ISA=avx2, ONEDNN_MAX_CPU_ISA=AVX2, in a
subprocess), writes a model card with the recipe, the commands, the data and its terms and the
development-split numbers of the same recipe trained on 001-050 (``--dev-report``: the report of
``qgait pipeline --report`` on that split), and adds each with :func:`qgait.zoo.add`.

``python tools/release_zoo.py --ptq FILE --ptq-dev HITS[,HITS...]`` adds a post-training model
instead (``FILE``: ``tools/ptq_eval.py --save`` on the release teacher) and its packed
conversion, ``zoo:casiab-lite3d-w8a8-ptq[-packed]``; their card's development-split table comes
from the hits files of the same steps on the dev-split teacher (one per calibration batch;
``--ptq-dev-packed``: those of ``ptq_eval --packed``).

``python tools/release_zoo.py --latency FILE`` prints one model file's latency as JSON (what the
capped subprocess runs).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PREFIX = "casiab-lite3d"
VARIANTS = ("w8a8", "w4a4")
DEV_NOTE = ("train 001-050, test 051-074, all 11 views, 2,629 test sequences; cross-view "
            "rank-1 (%) averaged over the 10 other gallery views and the 11 probe views")

CITATION = ('S. Yu, D. Tan, T. Tan, "A Framework for Evaluating the Effect of View Angle, '
            'Clothing and Carrying Condition on Gait Recognition", ICPR 2006')
METHOD = ('J. Tian et al., "QGait: Toward Accurate Quantization for Gait Recognition", '
          "arXiv 2405.13859")


def latency(path, reps: int = 20) -> dict:
    """Median ms per 30-frame sequence of a model file, with 1 thread and with torch's."""
    sys.path.insert(0, str(REPO / "bench"))
    from _common import cpu_class

    from qgait.model_io import load_model
    from qgait.pipeline.demo import latency_ms
    model, _ = load_model(path)
    default = torch.get_num_threads()
    out = {"cpu_class": cpu_class()}
    for n in sorted({1, default}):
        torch.set_num_threads(n)
        out[f"ms_{n}_threads"] = round(latency_ms(model, frames=30, reps=reps), 2)
    torch.set_num_threads(default)
    return out


def capped_latency(path) -> dict:
    env = dict(os.environ, QGAIT_CPU_ISA="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    r = subprocess.run([sys.executable, __file__, "--latency", str(path)], env=env,
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def _dev_rows(report: Path) -> dict:
    res = json.loads(report.read_text())
    return {r["variant"]: r for r in res["rows"]}


def _fmt_latency(lat: dict, capped: dict) -> str:
    lines = ["| CPU class (as measured) | 1 thread | 2 threads |", "| --- | --- | --- |"]
    for name, d in (("this build machine", lat), ("AVX2 class, capped", capped)):
        lines.append(f"| {name}: {d['cpu_class']} | {d.get('ms_1_threads', '-')} ms | "
                     f"{d.get('ms_2_threads', '-')} ms |")
    return "\n".join(lines)


def _what(kind: str, variant: str) -> str:
    bits = variant.upper() if variant != "fp" else "FP32"
    return {"fp": "full-precision teacher (fp32)",
            "fakequant": f"{bits} fake-quant model (QGait two-stage + IDC; fp32 weights on the "
                         "integer grid, for fine-tuning, export-onnx or convert)",
            "packed": f"{bits} packed integer model (QGait two-stage + IDC, converted: "
                      "integer convolutions, for CPU inference)"}[kind]


def _dev_text(variant: str, dev: dict) -> str:
    """The card's development-split table of a trained variant, from the dev report's rows."""
    bits = variant.upper() if variant != "fp" else "FP32"
    row = dev.get(variant) or {}
    lines = ["| condition | NM | BG | CL |", "| --- | --- | --- | --- |"]
    if row:
        label = "FP32, fp32" if variant == "fp" else f"{bits} packed integers"
        lines.append(f"| rank-1, {label} | {row['NM']:.1f} | {row['BG']:.1f} | {row['CL']:.1f} |")
        fp = dev.get("fp")
        if fp and variant != "fp":
            lines.append(f"| teacher FP32 (same split) | {fp['NM']:.1f} | {fp['BG']:.1f} | "
                         f"{fp['CL']:.1f} |")
    text = "\n".join(lines) + "\n"
    cmp = row.get("fakequant_vs_packed")
    if cmp:
        text += (f"\nOn the dev split the packed model and its fake-quant model agree to a "
                 f"relative embedding difference of {cmp['max_rel_diff']:.1e} at most "
                 f"({cmp['mean_rel_diff']:.1e} on average over {cmp['sequences']:,d} sequences); "
                 f"{cmp['probe_outcomes_changed']} probe outcomes differ.\n")
    return text


def card(name: str, what: str, file_bytes: int, model, lat: dict, capped: dict,
         dev_text: str, cmd: str, meta: dict) -> str:
    from qgait.pipeline.demo import inference_nbytes
    return f"""# zoo:{name}

GaitLite3D, width 1.0, {what}. Trained by qgait on CASIA-B (11 views).

| | |
| --- | --- |
| model | GaitLite3D width {model.arch['width']:g} ({meta['fp_parameters']:,d} parameters in fp32 without the training classifier; {inference_nbytes(model):,d} bytes of weights here), embeddings [N, {model.embed_dim}, {model.parts}] |
| input | binary silhouettes [N, 1, T, 64, 44] (OpenGait's 64 x 64 crops less 10 columns each side), 0 / 1 |
| file | {name}.qgm, {file_bytes:,d} bytes, qgait model file (tensors + JSON, read with `weights_only=True`) |
| trained on | CASIA-B subjects 001-074 (all 11 views, nm / bg / cl), {meta['steps']} |
| method | {meta.get('method', METHOD)} |

## Use

```
qgait embed zoo:{name} SEQUENCE.pkl            # an OpenGait .pkl/.pkl.gz or a folder of PNGs
qgait eval --checkpoint zoo:{name} --data CASIA-B-pkl --ids 075 124
python -c "import qgait.zoo as z; model, info = z.load('{name}')"
```

## Accuracy (development split, same recipe)

The release model was trained on all 74 shared subjects, so it has no held-out subjects of its
own here: CASIA-B's standard test subjects 075-124 were not available to the project, and are
evaluated independently. The numbers below are the **same recipe trained on 001-050** ({DEV_NOTE}):

{dev_text}
These are below published CASIA-B models (GaitSet 95.8 / 90.0 / 75.4 on 075-124, a different
test set): this model was trained for {meta['steps']}, on a 2-core CPU, not for 40k-120k iterations
on GPUs; see docs/results.md for its curve and what limits it.

## Speed

Median time per 30-frame sequence (one embedding), `python tools/release_zoo.py --latency FILE`:

{_fmt_latency(lat, capped)}

## Recipe (exact commands)

```
{cmd}
```

## Data and terms

Trained on the CASIA Gait Database, Dataset B (CBSR, Institute of Automation, Chinese Academy of
Sciences), silhouettes in OpenGait's pickle layout. CASIA releases the dataset for research use;
these weights are derived from it and are offered for research use under the same terms. Cite the
dataset ({CITATION}) and the method ({METHOD}). No silhouettes ship with qgait.
"""


def recipe_commands(fp: Path, quant: Path, dev_report: Path, dev: dict) -> dict:
    """The commands that made these runs, from their own checkpoints: the release teacher and
    pipeline, this release step and, where the dev report's teacher is here, the dev-split
    runs its numbers come from."""
    from qgait.model_io import read_header

    def config_name(ck: Path) -> str:
        return read_header(ck)["config"]["name"]

    qcfg = config_name(quant / VARIANTS[0] / "soft" / "final.pt")
    variants = " ".join(VARIANTS)
    cmds = {
        "teacher": f"qgait train --config {config_name(fp)} --out {fp.parent}",
        "quant": f"qgait pipeline --config {qcfg} --out {quant} --fp-checkpoint {fp} "
                 f"--variants {variants} --data.train_ids [001,074]",
        "release": f"python tools/release_zoo.py --fp {fp} --quant {quant} "
                   f"--dev-report {dev_report}",
    }
    dev_fp = Path((dev.get("fp") or {}).get("checkpoint", ""))
    if dev_fp.is_file():
        cmds["dev"] = "\n".join([
            "# the development-split numbers (the same recipe on train 001-050):",
            f"qgait train --config {config_name(dev_fp)} --out {dev_fp.parent}",
            f"qgait pipeline --config {qcfg} --out {dev_report.parent} --fp-checkpoint {dev_fp} "
            f"--variants {variants} --report"])
    return cmds


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def build(args) -> None:
    from qgait.model_io import file_sha256, load_checkpoint_model, read_header, save_model
    from qgait.quant import convert

    dev = _dev_rows(Path(args.dev_report))
    commands = recipe_commands(Path(args.fp), Path(args.quant), Path(args.dev_report), dev)
    cmd = "\n".join(commands[k] for k in ("teacher", "quant", "release", "dev") if k in commands)
    sources = {"fp": Path(args.fp)}
    for v in VARIANTS:
        sources[v] = Path(args.quant) / v / "soft" / "final.pt"
    work = Path(tempfile.mkdtemp(prefix="qgait-release-"))
    for variant, ck in sources.items():
        model, cfg = load_checkpoint_model(ck)
        model = copy.deepcopy(model).eval().drop_classifier()
        if variant == "fp":   # first: the variants' cards quote the teacher
            teacher_steps = f"{cfg['train']['iterations']:,d}"
            fp_params = _params(model)
            steps = f"{teacher_steps} iterations"
        else:
            qat = read_header(ck.parent.parent / "qat" / "final.pt")["config"]
            steps = (f"the teacher's {teacher_steps} iterations, then "
                     f"{qat['train']['iterations']} straight-through + "
                     f"{cfg['train']['iterations']} soft-quantizer iterations with IDC")
        kinds = [("fp", model)] if variant == "fp" else [
            ("fakequant", model), ("packed", convert(copy.deepcopy(model)))]
        for kind, m in kinds:
            name = f"{PREFIX}-{variant}" + ("-packed" if kind == "packed" else "")
            meta = {"source": str(ck), "source_sha256": file_sha256(ck),
                    "train_ids": cfg["data"]["train_ids"], "variant": variant, "steps": steps}
            f = work / f"{name}.qgm"
            save_model(m, f, meta, config=cfg)
            _add(name, f, m, _what(kind, variant), _dev_text(variant, dev), cmd,
                 dict(meta, fp_parameters=fp_params), args.zoo_dir)


def _add(name: str, f: Path, model, what: str, dev_text: str, cmd: str, meta: dict,
         zoo_dir) -> None:
    """Times the model file ``f``, writes its card beside it and adds both to the zoo."""
    from qgait import zoo
    lat, capped = latency(f), capped_latency(f)
    c = f.with_suffix(".md")
    c.write_text(card(name, what, f.stat().st_size, model, lat, capped, dev_text, cmd, meta))
    e = zoo.add(name, f, c, zoo_dir)
    print(f"added zoo:{name}: {e['kind']}, {e['bytes']:,d} bytes, "
          f"{lat.get('ms_1_threads')} ms (1 thread), capped AVX2 "
          f"{capped.get('ms_1_threads')} ms", flush=True)


W_RULE = {"lsq": "LSQ weight steps", "mse": "least-squares weight steps per output channel"}
A_RULE = {"mse": "least-squares activation steps", "max": "largest-magnitude activation steps",
          "pct": "{q:g}th-percentile activation steps"}


def ptq_command(setting: dict, out: Path, save: Path | None = None) -> str:
    """The ``tools/ptq_eval.py`` command line that made a recorded setting."""
    s = setting
    cmd = [f"python tools/ptq_eval.py --teacher {s['teacher']}"]
    if s.get("calib_ids"):
        cmd.append("--train-ids {} {}".format(*s["calib_ids"]))
    cmd.append(f"--bits {s['bits']}")
    if "calib" in s:      # (recorded since session 18; older runs used ptq_eval's default)
        cmd.append(f"--calib {s['calib']}")
    cmd.append(f"--w-init {s['w_init']} --a-init {s['a_init']}")
    if s.get("a_percentile") is not None:
        cmd.append(f"--a-percentile {s['a_percentile']:g}")
    cmd += [f"--seed {s['seed']}"] + ["--weights-only"] * bool(s.get("weights_only")) + \
        ["--packed"] * bool(s.get("packed"))
    if save is not None:
        cmd.append(f"--save {save}")
    return " ".join(cmd + [f"--out {out}"])


def _hits_runs(spec: str) -> list[tuple[Path, dict, dict]]:
    """(path, ptq_eval setting, hits) of each comma-separated hits file of tools/ptq_eval.py."""
    from qgait.pipeline.study import load_hits
    runs = []
    for p in map(Path, spec.split(",")):
        hits = load_hits(p)
        if hits is None:
            raise SystemExit(f"release_zoo: {p}: no such hits file (tools/ptq_eval.py writes "
                             "it beside its --out JSON)")
        runs.append((p, hits["key"], hits))
    return runs


def _ptq_dev_text(dev: list, packed: list, n_boot: int = 10000) -> tuple[str, list[str]]:
    """The PTQ card's development-split table (rank-1 mean +- std over calibration batches,
    the teacher, paired-bootstrap differences) and the commands that made its runs."""
    import numpy as np

    from qgait.evaluation.bootstrap import paired_bootstrap
    from qgait.pipeline.study import _rank1, hits_path, load_hits
    teacher = Path(dev[0][1]["teacher"])
    fp_path = hits_path(teacher)
    fp = load_hits(fp_path)
    if fp is None:
        raise SystemExit(f"release_zoo: {fp_path}: the dev teacher's hits are missing (`qgait "
                         f"study` writes them; or tools/ptq_eval.py on {teacher} at 32 bits)")
    conds = ("NM", "BG", "CL", "mean")
    lines = ["| rank-1 (%) | " + " | ".join(conds) + " |", "|" + " --- |" * (len(conds) + 1)]

    def row(label, runs):
        r = np.array([[_rank1(h)[c] for c in conds] for _, _, h in runs])
        cells = [f"{m:.1f}" for m in r.mean(0)]
        if len(runs) > 1:
            cells = [f"{c} +- {sd:.1f}" for c, sd in zip(cells, r.std(0, ddof=1))]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    def diff(label, runs):
        b = paired_bootstrap([h for _, _, h in runs], [fp], n_boot=n_boot)
        lines.append(f"| {label} | " + " | ".join(
            f"{b[c]['diff']:+.1f} [{b[c]['lo']:+.1f}, {b[c]['hi']:+.1f}]" for c in conds) + " |")

    n = len(dev)
    row(f"post-training W8A8, fake-quant ({n} calibration batches, mean +- std)", dev)
    if packed:
        row(f"the same, packed integers (calibration batch{'es' * (len(packed) > 1)} "
            f"{', '.join(str(s['seed']) for _, s, _ in packed)})", packed)
    row("teacher FP32 (same split)", [(fp_path, {}, fp)])
    diff("fake-quant - FP [95%]", dev)
    if packed:
        diff("packed - FP [95%]", packed)
    cmds = [ptq_command(s, p.with_name(p.name.replace(".hits.npz", ".json")))
            for p, s, _ in dev + packed]
    group = ",".join(str(p) for p, _, _ in dev)
    cmds.append(f"python tools/compare_hits.py {group} {fp_path}")
    return "\n".join(lines) + "\n", cmds


def build_ptq(args) -> None:
    """The post-training model (``--ptq``, a file of tools/ptq_eval.py --save) and its packed
    conversion, as ``zoo:casiab-lite3d-w8a8-ptq[-packed]``."""
    from qgait.model_io import file_sha256, load_model, read_header, save_model
    from qgait.nn.soft_quant import ACT_PERCENTILE
    from qgait.quant import convert

    src = Path(args.ptq)
    head = read_header(src)
    s = head["meta"].get("ptq")
    if not s or s.get("packed") or head["kind"] != "fakequant":
        raise SystemExit(f"release_zoo: {src}: not a fake-quant model of `tools/ptq_eval.py "
                         "--save` (its header has no 'ptq' setting, or it is packed)")
    teacher = read_header(Path(s["teacher"]))
    t_meta, t_cfg = teacher.get("meta") or {}, teacher["config"]
    t_steps = t_meta.get("steps") or f"{t_cfg['train']['iterations']:,d} iterations"
    t_ids = t_meta.get("train_ids") or t_cfg["data"]["train_ids"]
    variant = f"w{s['bits']}a{s['bits']}"
    rules = (f"{W_RULE[s['w_init']]}, "
             f"{A_RULE[s['a_init']].format(q=s.get('a_percentile') or ACT_PERCENTILE)}")
    steps = (f"the teacher's {t_steps} ({s['teacher']}), then post-training "
             f"quantization, no training: {rules}, set by one eval-mode forward of {s['calib']} "
             f"30-frame clips of subjects {'-'.join(s['calib_ids'])}")
    dev_text, dev_cmds = _ptq_dev_text(_hits_runs(args.ptq_dev),
                                       _hits_runs(args.ptq_dev_packed)
                                       if args.ptq_dev_packed else [])
    release = (f"python tools/release_zoo.py --ptq {src} --ptq-dev {args.ptq_dev}"
               + (f" --ptq-dev-packed {args.ptq_dev_packed}" if args.ptq_dev_packed else ""))
    cmd = "\n".join([f"# the teacher: zoo:{PREFIX}-fp (its card gives its recipe)",
                     ptq_command(s, src.with_suffix(".json"), src), release,
                     "# the development-split numbers (the same steps on the teacher trained "
                     "on 001-050):", *dev_cmds])
    model, _ = load_model(src)
    fp_params = _params(load_model(Path(s["teacher"]))[0].drop_classifier())
    work = Path(tempfile.mkdtemp(prefix="qgait-release-"))
    for kind, m in (("fakequant", model), ("packed", convert(copy.deepcopy(model)))):
        name = f"{PREFIX}-{variant}-ptq" + ("-packed" if kind == "packed" else "")
        what = (f"{variant.upper()} {'packed integer' if kind == 'packed' else 'fake-quant'} "
                "model, post-training quantization of the teacher zoo:casiab-lite3d-fp (no "
                "training; " + ("integer convolutions, for CPU inference)" if kind == "packed"
                                else "fp32 weights, for export-onnx or convert)"))
        meta = {"source": str(src), "source_sha256": file_sha256(src), "train_ids": t_ids,
                "variant": variant, "steps": steps, "ptq": s,
                "method": "post-training quantization with qgait's quantizers (hard rounding, "
                          "no training); the teacher is trained without quantization"}
        f = work / f"{name}.qgm"
        save_model(m, f, meta, config=head["config"])
        _add(name, f, m, what, dev_text, cmd, dict(meta, fp_parameters=fp_params), args.zoo_dir)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency", help="print one model file's latency (JSON) and stop")
    ap.add_argument("--fp", help="the release teacher's checkpoint")
    ap.add_argument("--quant", help="the release pipeline's output folder (w8a8/, w4a4/)")
    ap.add_argument("--dev-report", help="report.json of the same recipe on the dev split")
    ap.add_argument("--ptq", help="instead: a post-training model of tools/ptq_eval.py --save "
                    "(on the release teacher), added with its packed conversion")
    ap.add_argument("--ptq-dev", help="with --ptq: the hits files (comma-separated, one per "
                    "calibration batch) of the same steps on the dev-split teacher")
    ap.add_argument("--ptq-dev-packed", help="with --ptq: hits files of the same, --packed")
    ap.add_argument("--zoo-dir", default=None, help="default: the package's qgait/zoo")
    args = ap.parse_args(argv)
    if args.latency:
        print(json.dumps(latency(args.latency)))
        return 0
    if args.ptq:
        if not args.ptq_dev:
            ap.error("--ptq needs --ptq-dev (the dev-split runs its card reports)")
        build_ptq(args)
        return 0
    if not (args.fp and args.quant and args.dev_report):
        ap.error("--fp, --quant and --dev-report are needed")
    build(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
