"""Benchmark 11 (issue 12, rule 2): fine-tuning's epochs against the solved head stage, per recipe.

``headstart train --data SET --finetune-epochs 3 [recipe flags]`` with headstart's default backbone
(``--model M`` another: the rounds up to the fourth ran MobileNetV2 ``IMAGENET1K_V1``) on small
photo sets carved out of clothing-small's train split, as a user's own photos would be,
and on the bundled digits; one JSON line per set x recipe (appended to ``--results``): the head
stage's validation accuracy, then each fine-tuning epoch's, and with a weight average also the
weights as trained.

* ``s2``: dress vs shirt, 120 training and 120 validation photos each (224 px);
* ``s4``: longsleeve, pants, shirt, t-shirt, 200 training and 90 validation photos each (224 px);
* ``digits``: the default data (1,797 digits, 20% held out, 64 px).

    python bench/finetune_rule2.py --sets s2,s4,digits --recipes default,no-average
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import quality  # noqa: E402

BENCH = "finetune_rule2"
SETS = {"s2": (("dress", "shirt"), 120, 120), "s4": (("longsleeve", "pants", "shirt", "t-shirt"), 200, 90)}
RECIPES = {
    "default": [],
    "no-average": ["--finetune-average", "0"],
    "average-0.5": ["--finetune-average", "0.5"],
    "average-1": ["--finetune-average", "1"],
    # the last round's default rate: 1e-4 after half the stage warming up, whatever the stage's length
    "rate-1e-4": ["--finetune-lr", "1e-4", "--finetune-warmup-steps", "0"],
}


def photo_set(args: Any, name: str) -> Path:
    """The class-balanced subset ``name`` of clothing-small's train split (symlinks; the same every time)."""
    root = quality.clothing(args, BENCH)
    classes, n_train, n_val = SETS[name]
    picked = Path(args.work_dir) / f"rule2-{name}-classes"
    picked.mkdir(parents=True, exist_ok=True)
    for c in classes:
        if not (picked / c).exists():
            (picked / c).symlink_to((root / "train" / c).resolve())
    return common.make_subset(picked, Path(args.work_dir) / f"rule2-{name}", n_train, n_val, seed=0)


def run(args: Any, name: str, recipe: str) -> dict[str, Any]:
    data = ["--data", "digits"] if name == "digits" else ["--data", str(photo_set(args, name)),
                                                           "--input-size", "224"]
    model = ["--model", args.model] if args.model else []
    cmd = ["headstart", "train", *data, *model, "--finetune-epochs", "3", *RECIPES[recipe]]
    runs = Path(args.work_dir) / "rule2-runs"
    run_name = f"{name}-{recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
    book = ["--output", str(runs), "--name", run_name, "--no-progress", "--no-report", "--no-tensorboard",
            "--cache-dir", str(common.fresh_dir(Path(args.work_dir) / "rule2-cache"))]
    common.log("$ " + shlex.join(cmd))
    start = time.perf_counter()
    common.run_headstart([*cmd[1:], *book], runs / f"{run_name}.log", args.threads)
    rows = [json.loads(line) for line in (runs / run_name / "metrics.jsonl").read_text().splitlines() if line]
    head = [r["val_acc"] for r in rows if r["stage"] == "head"][-1]
    tuned = [r for r in rows if r["stage"] == "finetune"]
    return {"benchmark": BENCH, "set": name, "recipe": recipe, "model": args.model or default_model(),
            "head": round(head, 4),
            "finetune": [round(r["val_acc"], 4) for r in tuned],
            "as_trained": [round(r["val_acc_live"], 4) for r in tuned if "val_acc_live" in r],
            "worst_vs_head": round(min(r["val_acc"] for r in tuned) - head, 4),
            "seconds": round(time.perf_counter() - start, 1), "command": shlex.join(cmd),
            "machine": common.machine_info()}


def default_model() -> str:
    from headstart.config import RunConfig

    return RunConfig().model.name


def main() -> None:
    p = common.base_parser(__doc__.splitlines()[0])
    p.add_argument("--sets", default="s2,s4,digits")
    p.add_argument("--recipes", default="default,no-average", help=f"comma-separated: {', '.join(RECIPES)}")
    p.add_argument("--model", default=None, help="the backbone (default: headstart's default)")
    p.add_argument("--results", type=Path, default=common.REPO / "bench" / "results" / "finetune_rule2.jsonl")
    args = p.parse_args()
    for name in args.sets.split(","):
        for recipe in args.recipes.split(","):
            out = run(args, name, recipe)
            common.emit(out)
            with open(args.results, "a") as f:
                f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
