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


def card(name: str, kind: str, variant: str, file_bytes: int, model, lat: dict,
         capped: dict, dev: dict, commands: dict, meta: dict) -> str:
    from qgait.pipeline.demo import inference_nbytes
    bits = variant.upper() if variant != "fp" else "FP32"
    what = {"fp": "full-precision teacher (fp32)",
            "fakequant": f"{bits} fake-quant model (QGait two-stage + IDC; fp32 weights on the "
                         "integer grid, for fine-tuning, export-onnx or convert)",
            "packed": f"{bits} packed integer model (QGait two-stage + IDC, converted: "
                      "integer convolutions, for CPU inference)"}[kind]
    row = dev.get(variant) or {}
    dev_lines = ["| condition | NM | BG | CL |", "| --- | --- | --- | --- |"]
    if row:
        label = "FP32, fp32" if variant == "fp" else f"{bits} packed integers"
        dev_lines.append(f"| rank-1, {label} | {row['NM']:.1f} | {row['BG']:.1f} | "
                         f"{row['CL']:.1f} |")
        fp = dev.get("fp")
        if fp and variant != "fp":
            dev_lines.append(f"| teacher FP32 (same split) | {fp['NM']:.1f} | {fp['BG']:.1f} | "
                             f"{fp['CL']:.1f} |")
    cmp = row.get("fakequant_vs_packed")
    agree = ""
    if cmp:
        agree = (f"\nOn the dev split the packed model and its fake-quant model agree to a relative "
                 f"embedding difference of {cmp['max_rel_diff']:.1e} at most "
                 f"({cmp['mean_rel_diff']:.1e} on average over {cmp['sequences']:,d} sequences); "
                 f"{cmp['probe_outcomes_changed']} probe outcomes differ.\n")
    cmd = "\n".join(commands[k] for k in ("teacher", "quant", "release", "dev")
                    if k in commands)
    return f"""# zoo:{name}

GaitLite3D, width 1.0, {what}. Trained by qgait on CASIA-B (11 views).

| | |
| --- | --- |
| model | GaitLite3D width {model.arch['width']:g} ({meta['fp_parameters']:,d} parameters in fp32 without the training classifier; {inference_nbytes(model):,d} bytes of weights here), embeddings [N, {model.embed_dim}, {model.parts}] |
| input | binary silhouettes [N, 1, T, 64, 44] (OpenGait's 64 x 64 crops less 10 columns each side), 0 / 1 |
| file | {name}.qgm, {file_bytes:,d} bytes, qgait model file (tensors + JSON, read with `weights_only=True`) |
| trained on | CASIA-B subjects 001-074 (all 11 views, nm / bg / cl), {meta['steps']} |
| method | {METHOD} |

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

{chr(10).join(dev_lines)}
{agree}
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
    from qgait import zoo
    from qgait.model_io import file_sha256, load_checkpoint_model, read_header, save_model
    from qgait.quant import convert

    dev = _dev_rows(Path(args.dev_report))
    commands = recipe_commands(Path(args.fp), Path(args.quant), Path(args.dev_report), dev)
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
            lat, capped = latency(f), capped_latency(f)
            text = card(name, kind, variant, f.stat().st_size, m, lat, capped, dev,
                        commands, dict(meta, fp_parameters=fp_params))
            c = work / f"{name}.md"
            c.write_text(text)
            e = zoo.add(name, f, c, args.zoo_dir)
            print(f"added zoo:{name}: {e['kind']}, {e['bytes']:,d} bytes, "
                  f"{lat.get('ms_1_threads')} ms (1 thread), capped AVX2 "
                  f"{capped.get('ms_1_threads')} ms", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latency", help="print one model file's latency (JSON) and stop")
    ap.add_argument("--fp", help="the release teacher's checkpoint")
    ap.add_argument("--quant", help="the release pipeline's output folder (w8a8/, w4a4/)")
    ap.add_argument("--dev-report", help="report.json of the same recipe on the dev split")
    ap.add_argument("--zoo-dir", default=None, help="default: the package's qgait/zoo")
    args = ap.parse_args(argv)
    if args.latency:
        print(json.dumps(latency(args.latency)))
        return 0
    if not (args.fp and args.quant and args.dev_report):
        ap.error("--fp, --quant and --dev-report are needed")
    build(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
