"""Issue 12: how far the ``--budget`` planner's epoch estimate is from the epoch it then runs.

For one folder and backbone, on the freshly prepared network (its new head untrained; the step
cost does not depend on it): the whole-network candidate of
:func:`headstart.training.budget.measure_plans` (the planner's per-epoch estimate), then N
consecutive whole-network training steps of that stage on one batch, each timed, so the series
shows when step times settle. One JSON line; compare ``planner_epoch_s`` with a real run's epoch
seconds in its ``metrics.jsonl``.

    python bench/budget_estimate.py --data /tmp/hb/clothing-small --model mobilenet_v2 --input-size 224
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    import torch

    from headstart.config import RunConfig, apply_overrides
    from headstart.data import make_loader
    from headstart.jobs.train import prepare
    from headstart.models.freeze import unfreeze_last
    from headstart.training.budget import measure_plans
    from headstart.training.optim import apply_stage, build_optimizer, finetune_stage

    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a folder with train/ and val/ (or validation/)")
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=12, help="consecutive steps to time")
    args = p.parse_args()
    common.setup_torch(args.threads)
    cfg = apply_overrides(RunConfig(), {"data.source": args.data, "model.name": args.model,
                                        "model.weights": "DEFAULT", "model.input_size": args.input_size,
                                        "train.progress": False, "cache.dir": str(Path(args.work_dir) / "cache")})
    net, data = prepare(cfg)
    whole = measure_plans(net, data, cfg, torch.device("cpu"))[-1]  # the last candidate: the whole network
    x, y = next(iter(make_loader(data.train, batch_size=cfg.data.batch_size, shuffle=True, workers=0, seed=0)))
    stage = finetune_stage(cfg.train, "probe", 1, unfreeze_last(net, "all"))
    apply_stage(net, stage)
    opt = build_optimizer(net, stage, cfg.train)
    loss_fn = torch.nn.CrossEntropyLoss()
    steps = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps.append(time.perf_counter() - start)
    batches = max(1, len(data.train) // cfg.data.batch_size)
    common.emit(common.round_floats({
        "benchmark": "budget_estimate", "model": args.model, "input_size": args.input_size,
        "train_images": len(data.train), "batch_size": cfg.data.batch_size,
        "planner_epoch_s": whole.epoch_s, "step_s": steps,
        "epoch_s_from_last_steps": batches * common.median(steps[-3:]),
        "machine": common.machine_info()}))


if __name__ == "__main__":
    main()
