"""Benchmark 4 (issues 4 and 12): the accuracy headstart's defaults reach on real data, against
the baselines a careful person would write by hand.

One data set and one backbone per call; one JSON line per contender on stdout (and appended to
``--results``, so a table can be built from runs made in parts):

* ``head``: ``headstart train --data D --model M --weights DEFAULT --input-size S`` — head only,
  every other setting at its default (the solved head), on a fresh feature cache;
* ``probe``: the tuned linear probe, the floor: scikit-learn ``StandardScaler`` + ``LogisticRegression``
  on the *same* frozen features (read from the cache ``head`` wrote, so they are the very same
  numbers), C from a 9-value grid by 5-fold stratified cross-validation on the training split;
* ``budget``: ``headstart train ... --budget 15m`` on a fresh cache (a first run, extraction counted);
* ``tutorial-fixed`` / ``tutorial-finetune``: the torchvision tutorial's recipe as it is written
  there (``bench/tutorial_recipe.py``): 25 epochs of SGD at batch 4, the best epoch kept.

Data sets (``--data``): ``clothing`` (``../shared/data/clothing-small.tar.gz``: 3,068 train / 341
validation real photos, 10 imbalanced classes; trained on ``train/``, reported on ``validation/``),
``cifar`` (the class-balanced CIFAR-10 subset, 5,000 / 1,000, of ``common.make_subset``) and
``digits`` (scikit-learn's 1,797 digits written as a folder of PNGs with a stratified, seeded
80/20 split, so every contender reads the same files). Input sizes are fixed per data set and
backbone (``SIZES``).

    python bench/quality.py --data clothing --model mobilenet_v2 --contenders head,probe
    python bench/quality.py --data cifar --model lite0 --contenders head,probe,budget
    python bench/quality.py --table          # the Markdown table of bench/results/quality.jsonl
"""

from __future__ import annotations

import json
import shlex
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import tutorial_recipe  # noqa: E402

BENCH = "quality"
MODELS = {"mobilenet_v2": "mobilenet_v2", "lite0": "tf_efficientnet_lite0", "lite1": "tf_efficientnet_lite1",
          "lite2": "tf_efficientnet_lite2"}
# Photos at each backbone's native size; the CIFAR subset at 128 px (the setting); digits at 64.
NATIVE = {"mobilenet_v2": 224, "lite0": 224, "lite1": 240, "lite2": 260}
SIZES = {"clothing": NATIVE, "cifar": dict.fromkeys(NATIVE, 128), "digits": dict.fromkeys(NATIVE, 64)}
C_GRID = [1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0]
CONTENDERS = ("head", "probe", "budget", "tutorial-fixed", "tutorial-finetune")


# ---------------------------------------------------------------------- data sets


def clothing(args: Any, bench: str = BENCH) -> Path:
    """clothing-small unpacked (once) into ``--work-dir``; ``bench`` names the benchmark that skips without it."""
    tarball = Path(args.data_dir) / "clothing-small.tar.gz"
    if not tarball.is_file():
        common.skip(bench, f"{tarball} not found (real data lives in ../shared/data; pass --data-dir)")
    dest = Path(args.work_dir) / "clothing-small"
    if not (dest / ".complete").exists():
        common.log(f"unpacking {tarball}")
        with tarfile.open(tarball) as tf:
            tf.extractall(Path(args.work_dir), filter="data")
        (dest / ".complete").write_text(time.strftime("%Y-%m-%d %H:%M:%S"))
    return dest


def digits_folder(args: Any) -> Path:
    """The digits as 8x8 grayscale PNGs in ``train/`` and ``val/`` (stratified 80/20, seed 0)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    dest = Path(args.work_dir) / "digits-folder"
    if (dest / ".complete").exists():
        return dest
    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    tr, va = train_test_split(np.arange(len(images)), test_size=0.2, random_state=0, stratify=d.target)
    for split, ids in (("train", tr), ("val", va)):
        for i in ids:
            folder = dest / split / str(d.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(folder / f"{i:04d}.png")
    (dest / ".complete").write_text(time.strftime("%Y-%m-%d %H:%M:%S"))
    return dest


def data_folder(args: Any) -> Path:
    if args.data == "clothing":
        return clothing(args)
    if args.data == "cifar":
        return common.subset_for(args, BENCH, 500, 100)
    return digits_folder(args)


# ---------------------------------------------------------------------- headstart contenders


def headstart_run(args: Any, folder: Path, name: str, cache: Path, extra: list[str]) -> dict[str, Any]:
    """Run ``headstart train`` in a subprocess; its summary, per-epoch accuracies and wall time."""
    name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"  # unique: runs of several parts share the folder
    size = SIZES[args.data][args.model]
    cmd = ["headstart", "train", "--data", str(folder), "--model", MODELS[args.model], "--weights", "DEFAULT",
           "--input-size", str(size), *extra]
    # Bookkeeping only (where to write, no bars, no report or TensorBoard files): no effect on training.
    runs = Path(args.work_dir) / "quality-runs"
    book = ["--cache-dir", str(cache), "--output", str(runs), "--name", name, "--no-progress", "--no-report",
            "--no-tensorboard"]
    common.log("$ " + shlex.join(cmd))
    start = time.perf_counter()
    common.run_headstart([*cmd[1:], *book], runs / f"{name}.log", args.threads)
    seconds = time.perf_counter() - start
    run_dir = runs / name
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    per_stage: dict[str, list[float]] = {}
    for r in rows:
        per_stage.setdefault(r["stage"], []).append(round(r["val_acc"], 4))
    solved = next((r["solved"] for r in rows if r.get("solved")), None)
    return {"val_acc": summary["final_val_accuracy"], "best_val_acc": summary["best_val_accuracy"],
            "seconds": seconds, "val_acc_per_epoch": per_stage, "solved": solved,
            "budget_plan": summary.get("budget_plan"), "command": shlex.join(cmd), "run_dir": str(run_dir)}


def cache_dir(args: Any, fresh: bool = False) -> Path:
    path = Path(args.work_dir) / f"quality-cache-{args.data}-{args.model}"
    return common.fresh_dir(path) if fresh else path


def head(args: Any, folder: Path) -> dict[str, Any]:
    return headstart_run(args, folder, f"{args.data}-{args.model}-head", cache_dir(args, fresh=True), [])


def budget(args: Any, folder: Path) -> dict[str, Any]:
    cache = common.fresh_dir(Path(args.work_dir) / f"quality-cache-{args.data}-{args.model}-budget")
    extra = shlex.split(args.extra)
    out = headstart_run(args, folder, f"{args.data}-{args.model}-budget", cache, ["--budget", args.budget, *extra])
    out["budget"] = args.budget
    if extra:
        out["extra"] = args.extra
    return out


# ---------------------------------------------------------------------- the probe


def cached_split(cache: Path, source: str, images: int) -> Any:
    """The view-0 feature array whose entry says ``source`` for ``images`` images (written by ``head``)."""
    import numpy as np

    for meta_file in cache.glob("*/view0.json"):
        meta = json.loads(meta_file.read_text())
        if meta["source"] == source and meta["images"] == images and meta["part"] == "body":
            return np.asarray(np.load(meta_file.with_suffix(".npy"), mmap_mode="r"), dtype=np.float32)
    raise SystemExit(f"no cached '{source}' features for {images} images in {cache}: run the head contender first")


def probe(args: Any, folder: Path) -> dict[str, Any]:
    """Logistic regression on the head contender's cached features; labels from headstart's own scan."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from headstart.config import RunConfig
    from headstart.data import build_data
    from headstart.models.preprocess import Preprocessing

    cfg = RunConfig()
    cfg.data.source = str(folder)
    # The same scan, order and labels headstart trained on (the preprocessing does not change them).
    data = build_data(cfg.data, Preprocessing(), seed=cfg.train.seed, progress=False)
    ytr, yva = np.asarray(data.train.targets), np.asarray(data.val.targets)
    cache = cache_dir(args)
    xtr = cached_split(cache, "features train view 0", len(ytr))
    xva = cached_split(cache, "features val", len(yva))
    start = time.perf_counter()
    grid = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)),
                        {"logisticregression__C": C_GRID},
                        cv=StratifiedKFold(n_splits=5, shuffle=True, random_state=0), n_jobs=1)
    grid.fit(xtr, ytr)
    best_c = grid.best_params_["logisticregression__C"]
    return {"val_acc": float((grid.predict(xva) == yva).mean()), "seconds": time.perf_counter() - start,
            "best_C": best_c, "cv_acc": float(grid.best_score_), "features": list(xtr.shape),
            "command": f"StandardScaler + LogisticRegression, C in {C_GRID} by 5-fold CV on train, "
                       f"on the features in {cache}"}


# ---------------------------------------------------------------------- the tutorial's recipe


def tutorial(args: Any, folder: Path, mode: str) -> dict[str, Any]:
    size = SIZES[args.data][args.model]
    progress = Path(args.work_dir) / f"tutorial-{mode}-{args.data}-{args.model}.jsonl"
    progress.unlink(missing_ok=True)
    out = tutorial_recipe.run(folder, MODELS[args.model], "DEFAULT", size, mode, epochs=args.tutorial_epochs,
                              time_limit=args.time_limit, progress=progress, workers=1)
    out["command"] = (f"python bench/tutorial_recipe.py --data {folder} --model {MODELS[args.model]} "
                      f"--input-size {size} --mode {mode} --epochs {args.tutorial_epochs}")
    return out


# ---------------------------------------------------------------------- the table


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _cell(line: dict[str, Any] | None) -> str:
    """One contender's cell: final accuracy (best, where kept) and wall time; partial runs say so."""
    if line is None:
        return "not run"
    text = _pct(line["val_acc"])
    if line.get("best_val_acc") is not None and line["best_val_acc"] != line["val_acc"]:
        text += f" (best {_pct(line['best_val_acc'])})"
    text += f", {line['seconds'] / 60:.1f} min"
    if line.get("stopped_by_time_limit"):
        text += f", {line['epochs_run']} of {line['epochs_planned']} epochs"
    return text


def _rule2(line: dict[str, Any] | None) -> str:
    """Fine-tuning epochs against the head stage: the worst epoch's and the last epoch's difference."""
    if line is None:
        return "–"
    per = line["val_acc_per_epoch"]
    head = per.get("head", [None])[-1]
    tuned = [a for stage, accs in per.items() if stage != "head" for a in accs]
    if head is None or not tuned:
        return "no fine-tuning epoch"
    return f"worst {100 * (min(tuned) - head):+.1f}, last {100 * (tuned[-1] - head):+.1f} ({len(tuned)} epochs)"


def table(results: Path) -> str:
    """A Markdown table of the latest line of each data set x backbone x contender in ``results``
    (the defaults' runs: a variant's line, one run with ``--extra`` flags, is left out)."""
    latest: dict[tuple[str, str, str], dict[str, Any]] = {}
    for raw in results.read_text().splitlines():
        line = json.loads(raw) if raw.strip() else {}
        if line and not line.get("extra"):
            latest[(line["data"], line["model"], line["contender"])] = line
    rows = ["| data | backbone (px) | probe | tutorial, fixed features | **headstart head-only** | tutorial, "
            "fine-tune | **headstart --budget 15m** | budget's fine-tuning vs its head stage (points) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    pairs = sorted({(d, m) for d, m, _ in latest}, key=lambda dm: (list(SIZES).index(dm[0]), list(MODELS).index(dm[1])))
    for data, model in pairs:
        get = {c: latest.get((data, model, c)) for c in CONTENDERS}
        probe_line = get["probe"]
        probe_text = "not run" if probe_line is None else f"{_pct(probe_line['val_acc'])} (C={probe_line['best_C']})"
        rows.append(f"| {data} | {model} ({SIZES[data][model]}) | {probe_text} | {_cell(get['tutorial-fixed'])} | "
                    f"{_cell(get['head'])} | {_cell(get['tutorial-finetune'])} | {_cell(get['budget'])} | "
                    f"{_rule2(get['budget'])} |")
    return "\n".join(rows)


def main() -> None:
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=tuple(SIZES), help="the data set (required unless --table)")
    p.add_argument("--model", choices=tuple(MODELS), default="mobilenet_v2")
    p.add_argument("--contenders", default="head,probe", help=f"comma-separated: {', '.join(CONTENDERS)}")
    p.add_argument("--budget", default="15m", help="the budget contender's --budget")
    p.add_argument("--extra", default="",
                   help="more headstart flags for the budget contender (a variant: give it its own --results)")
    p.add_argument("--tutorial-epochs", type=int, default=tutorial_recipe.EPOCHS)
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds: stop a tutorial run at the first epoch end past it (the line says so)")
    p.add_argument("--results", type=Path, default=Path(common.REPO) / "bench" / "results" / "quality.jsonl")
    p.add_argument("--table", action="store_true", help="print the Markdown table of --results and exit")
    args = p.parse_args()
    if args.table:
        print(table(args.results))
        return
    if args.data is None:
        p.error("--data is required")
    common.setup_torch(args.threads)
    folder = data_folder(args)
    for name in args.contenders.split(","):
        if name not in CONTENDERS:
            raise SystemExit(f"unknown contender {name!r}: use {', '.join(CONTENDERS)}")
        common.log(f"{args.data} / {args.model}: {name}")
        if name.startswith("tutorial-"):
            result = tutorial(args, folder, name.split("-", 1)[1])
        else:
            result = {"head": head, "probe": probe, "budget": budget}[name](args, folder)
        line = common.round_floats({"benchmark": BENCH, "data": args.data, "model": args.model,
                                    "input_size": SIZES[args.data][args.model], "contender": name, **result,
                                    "machine": common.machine_info()})
        common.emit(line)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        with args.results.open("a") as f:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
