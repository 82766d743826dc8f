"""The model card: a README.md that says what a model is, how well it did, how to load it, and its limits.

Everything in it is read from records: the checkpoint's config and class names, the run folder's
``summary.json``, the export's ``config.json`` (format, verification) and, when the export was
verified on the run's validation split, the per-class scores measured there.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def model_card(meta: dict[str, Any], ckpt: dict[str, Any] | None = None, run_dir: Path | None = None,
               evaluation: dict[str, Any] | None = None) -> str:
    """Markdown for a model described by ``meta`` (config.json's fields).

    ``ckpt`` gives the training config, ``run_dir`` the run's ``summary.json``, ``evaluation`` a
    :meth:`~headstart.metrics.ClassReport.to_dict` of the model on the validation split.
    """
    cfg = (ckpt or {}).get("config") or {}
    summary = _summary(run_dir)
    parts = [
        _title(meta, cfg, summary),
        _data(meta, cfg, summary),
        _metrics(summary, evaluation, meta),
        _verification(meta.get("verification")),
        _int8(meta),
        _input(meta),
        _loading(meta),
        _limits(meta, cfg, summary, evaluation),
    ]
    return "\n\n".join(p for p in parts if p) + "\n"


def _summary(run_dir: Path | None) -> dict[str, Any]:
    if run_dir is None or not (run_dir / "summary.json").is_file():
        return {}
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except ValueError:
        return {}


def _title(meta: dict[str, Any], cfg: dict[str, Any], summary: dict[str, Any]) -> str:
    weights = summary.get("weights") or cfg.get("model", {}).get("weights", "unknown")
    head = meta.get("head", {})
    mlp = head.get("kind") == "mlp" and head.get("hidden")
    hidden = f" (hidden {', '.join(map(str, head['hidden']))})" if mlp else ""
    fmt = meta.get("model_format", "checkpoint")
    precision = " int8" if meta.get("precision") == "int8" else ""
    what = "a headstart checkpoint" if fmt == "checkpoint" else f"exported as **{fmt}{precision}**"
    return "\n".join([
        f"# {meta['arch']} image classifier, {meta['num_classes']} classes",
        "",
        f"An image classifier trained with headstart by transfer learning, {what}.",
        "",
        f"- backbone: `{meta['arch']}` from {meta.get('source', 'torchvision')}, pretrained weights `{weights}`",
        f"- classifier: headstart `{head.get('kind', 'replace')}` head{hidden}",
        f"- classes: {', '.join(f'`{c}`' for c in meta['classes'][:50])}"
        + (f" and {len(meta['classes']) - 50} more" if len(meta["classes"]) > 50 else ""),
    ])


def _data(meta: dict[str, Any], cfg: dict[str, Any], summary: dict[str, Any]) -> str:
    counts = summary.get("class_counts")
    source = summary.get("data") or cfg.get("data", {}).get("source")
    if not counts:
        return f"## Data\n\nTrained on `{source}`; the run folder's summary.json (class counts) was not available." \
            if source else ""
    rows = ["| class | train | validation |", "| --- | ---: | ---: |"]
    for c in meta["classes"]:
        rows.append(f"| {c} | {counts.get('train', {}).get(c, 0)} | {counts.get('val', {}).get(c, 0)} |")
    n_train, n_val = sum(counts.get("train", {}).values()), sum(counts.get("val", {}).values())
    rows.append(f"| **total** | **{n_train}** | **{n_val}** |")
    return f"## Data\n\n`{source}`: {n_train} training and {n_val} validation images.\n\n" + "\n".join(rows)


def _metrics(summary: dict[str, Any], evaluation: dict[str, Any] | None, meta: dict[str, Any]) -> str:
    lines = ["## Validation metrics", ""]
    if summary.get("final_val_accuracy") is not None:
        top5 = summary.get("final_val_top5")
        lines.append(f"At the end of training: top-1 **{summary['final_val_accuracy']:.2%}**"
                     + (f", top-5 {top5:.2%}" if top5 is not None else "")
                     + f" (best epoch {summary.get('best_val_accuracy', float('nan')):.2%}).")
    if evaluation:
        exported = evaluation.get("export_top1")
        n = sum(r["support"] for r in evaluation["per_class"])
        what = f"{meta.get('model_format')}{' int8' if meta.get('precision') == 'int8' else ''}"
        where = (meta.get("verification") or {}).get("inputs", "the validation split")
        lines += ["", f"Measured at export time on {n} labelled images ({where}): the PyTorch "
                  f"model top-1 **{evaluation['top1']:.2%}**"
                  + (f", this {what} file **{exported:.2%}**" if exported is not None else "")
                  + ".", "", "| class | precision | recall | F1 | images |", "| --- | ---: | ---: | ---: | ---: |"]
        for r in evaluation["per_class"]:
            lines.append(f"| {r['class']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} "
                         f"| {r['support']} |")
    if len(lines) == 2:
        return ""
    return "\n".join(lines[:2] + [line for i, line in enumerate(lines[2:]) if line or i > 0])


def _int8(meta: dict[str, Any]) -> str:
    q = meta.get("int8")
    if not q:
        return ""
    rows = ["| method | speed vs fp32 ONNX | top-1 | change | chosen |", "| --- | ---: | ---: | ---: | --- |"]
    for c in q["candidates"]:
        acc = "not measured (slower than fp32)" if c["top1"] is None else f"{c['top1']:.2%}"
        change = "" if c["top1_change"] is None else f"{c['top1_change'] * 100:+.1f} points"
        chosen = "yes" if c["method"] == q["method"] else ""
        rows.append(f"| {c['method']} | {c['speedup']:.2f}x | {acc} | {change} | {chosen} |")
    return "\n".join([
        "## int8", "",
        f"Quantised with ONNX Runtime; static quantisation calibrated on {q['calibration_images']} training images "
        f"({q.get('calibration', 'minmax')} activation ranges), "
        f"dynamic without calibration. Both were measured on {q['measured_on']} (top-1 against "
        f"{q['top1_basis']}), and the fastest one within 1 point of fp32's top-1 was kept:", "", *rows,
    ])


def _verification(v: dict[str, Any] | None) -> str:
    if not v:
        return ""
    limit = "no limit (int8 is judged by agreement)" if v.get("tolerance_max_abs") is None else \
        f"limit {v['tolerance_max_abs']:.3g}"
    need = f" (limit {v['tolerance_top1']:.0%})" if v.get("tolerance_top1") else ""
    return "\n".join([
        "## Verification", "",
        f"When this file was written it was run beside the PyTorch model on {v['images']} images ({v['inputs']}):",
        "",
        f"- largest absolute logit difference: **{v['max_abs_diff']:.3g}** ({limit}; the logits reach "
        f"{v['reference_scale']:.3g})",
        f"- top-1 agreement with the PyTorch model: **{v['top1_agreement']:.2%}**{need}",
    ])


def transform_code(meta: dict[str, Any]) -> str:
    """The torchvision lines that prepare an image exactly as the model expects."""
    p = meta["preprocessing"]
    interp = f"v2.InterpolationMode.{p['interpolation'].upper()}"
    if meta.get("kind") == "digits":
        size = f"v2.Resize(({p['crop']}, {p['crop']}), interpolation={interp}, antialias=True)"
    else:
        size = f"v2.Resize({p['resize']}, interpolation={interp}, antialias=True), v2.CenterCrop({p['crop']})"
    mean = ", ".join(f"{m:.4g}" for m in p["mean"])
    std = ", ".join(f"{s:.4g}" for s in p["std"])
    return (f"transform = v2.Compose([v2.ToImage(), {size},\n"
            f"                        v2.ToDtype(torch.float32, scale=True), v2.Normalize([{mean}], [{std}])])")


def _input(meta: dict[str, Any]) -> str:
    p = meta["preprocessing"]
    how = (f"resized to {p['crop']}x{p['crop']}" if meta.get("kind") == "digits" else
           f"shorter side resized to {p['resize']} px ({p['interpolation']}), centre crop {p['crop']}x{p['crop']}")
    return "\n".join([
        "## Input", "",
        f"RGB images, {how}, scaled to [0, 1], normalised with mean {list(p['mean'])} and std {list(p['std'])}: "
        f"a float32 tensor `(N, 3, {p['crop']}, {p['crop']})` (NCHW). The output is `(N, {meta['num_classes']})` "
        "logits in the class order above (softmax gives probabilities).",
        "", "```python", "import torch", "from torchvision.transforms import v2", transform_code(meta),
        "x = transform(PIL.Image.open(\"photo.jpg\").convert(\"RGB\"))[None]", "```",
    ])


def load_code(meta: dict[str, Any]) -> str:
    """Three lines that load this export with its own library and compute logits for ``x``."""
    fmt, file = meta.get("model_format"), meta.get("model_file", "")
    if fmt == "onnx":
        return "\n".join(["import onnxruntime", f"session = onnxruntime.InferenceSession(\"{file}\")",
                          "logits = session.run(None, {\"input\": x.numpy()})[0]"])
    if fmt == "torchscript":
        return "\n".join(["import torch", f"model = torch.jit.load(\"{file}\").eval()", "logits = model(x)"])
    if fmt == "safetensors":
        return _library_code(meta)
    return "\n".join(["import headstart as hs", "net, _ = hs.load_network(\"best.pt\")", "logits = net.eval()(x)"])


def _library_code(meta: dict[str, Any]) -> str:
    from .library import head_code

    spec = meta["library"]
    kwargs = "".join(f", {k}={tuple(v) if isinstance(v, list) else v!r}" for k, v in spec["kwargs"].items())
    if spec["package"] == "timm":
        build = (f"import timm, safetensors.torch\nmodel = timm.create_model(\"{spec['name']}\", "
                 f"num_classes={spec['num_classes']}{kwargs})")
    else:
        build = (f"import torchvision, safetensors.torch\nmodel = torchvision.models.get_model(\"{spec['name']}\", "
                 f"num_classes={spec['num_classes']}{kwargs})")
    lines = [build]
    if spec["head"] == "custom":
        lines.append(f"model.{spec['classifier']} = {head_code(spec['head_layers'])}  # headstart's head, see below")
    lines.append(f"model.load_state_dict(safetensors.torch.load_file(\"{meta['model_file']}\"))")
    lines.append("logits = model.eval()(x)")
    return "\n".join(lines)


def _loading(meta: dict[str, Any]) -> str:
    text = ["## How to load it", "", "```python", load_code(meta), "```"]
    spec = meta.get("library") or {}
    if spec.get("head") == "custom":
        text += ["", f"headstart's `{meta['head'].get('kind')}` head is not {spec['package']}'s own classifier for "
                 f"`{spec['name']}`, so the plain model gets it in place of `{spec['classifier']}` (the second line "
                 "above); its weights are in the same file under that name, and `head.safetensors` holds them alone."]
    if meta.get("model_format") != "checkpoint":
        text += ["", "Or with headstart: `headstart predict THIS_FOLDER photo.jpg`, "
                 "`headstart eval THIS_FOLDER --data DIR`, "
                 "`headstart serve THIS_FOLDER`."]
    return "\n".join(text)


def _limits(meta: dict[str, Any], cfg: dict[str, Any], summary: dict[str, Any],
            evaluation: dict[str, Any] | None) -> str:
    n = meta["num_classes"]
    items = [f"It knows only these {n} classes and always answers one of them: an image of something else still "
             "gets one of these names, often with a high probability.",
             "Images must be prepared exactly as under Input; another resize, crop or normalisation lowers accuracy "
             "without any error."]
    counts = (summary.get("class_counts") or {}).get("val") or {}
    n_val = sum(counts.values())
    acc = summary.get("final_val_accuracy")
    if n_val and acc is not None:
        half = 1.96 * math.sqrt(max(acc * (1 - acc), 1e-9) / n_val)
        items.append(f"The validation figure comes from {n_val} images of the same source as the training data: "
                     f"its 95% interval is about ±{half:.1%}, and photos from elsewhere (other cameras, light, "
                     "framing) "
                     "usually score lower.")
    train = (summary.get("class_counts") or {}).get("train") or {}
    if train and max(train.values()) >= 3 * max(1, min(train.values())):
        small = min(train, key=train.get)
        items.append(f"The classes are imbalanced ({min(train.values())} `{small}` to {max(train.values())} training "
                     f"images): rare classes are recognised less reliably.")
    if str(summary.get("weights") or cfg.get("model", {}).get("weights", "?")).lower() in ("none", "random", ""):
        items.append("The backbone started from random weights, not pretrained ones.")
    if meta.get("precision") == "int8":
        items.append("Weights and activations are int8: answers can differ from the fp32 model on close calls "
                     "(see Verification).")
    return "## Limits\n\n" + "\n".join(f"- {i}" for i in items)
