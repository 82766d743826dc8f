"""Benchmark 2 (issue 3): full fine-tuning throughput of headstart's training step vs a hand-written loop.

Both contenders train every parameter of the same architecture (MobileNetV2 with its
``IMAGENET1K_V1`` weights by default, or ``--model tf_efficientnet_lite0``) at 128 px, batch 32,
fp32, on the same pre-decoded real CIFAR-10 images held in memory as ready batches, so the data
pipeline is not measured:

* ``headstart``: ``headstart.training.loop.train_one_epoch`` over the batches, with the optimizer and the
  schedule headstart builds for a fine-tuning stage (``optim.build_optimizer`` /
  ``build_scheduler``: AdamW with per-depth-group parameter groups, warmup + cosine per step);
* ``hand``: the textbook loop on a plain torchvision (or timm) model: forward, cross-entropy,
  ``zero_grad``, ``backward``, ``AdamW.step``, ``LambdaLR.step``, ``loss.item()``.

BatchNorm runs in train mode on both sides by default (``--bn eval-all`` puts every BatchNorm in
eval mode on both, headstart's default for fine-tuning). After a warm-up, the contenders
alternate (A B A B ...) for ``--rounds`` rounds of ``--steps`` steps each; the result line gives
the median images/s of each and the ratio headstart / hand (target >= 0.95), plus the median of
the per-round ratios and the best round of each (the least disturbed by other processes: on a
shared 2-core machine a competing process can slow a 2-thread run down by 10x or more). Each
round is bracketed by a contention probe (``common.tiny_op_ms``); the ``quiet_*`` numbers use only
the rounds whose probe stayed under ``common.QUIET_PROBE_MS``.

    python bench/finetune_throughput.py            # full: 10 rounds x 5 steps of 32 images at 128 px
    python bench/finetune_throughput.py --quick    # 3 rounds x 2 steps at 64 px
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BENCH = "finetune_throughput"


def load_batches(subset: Path, pre: Any, n_batches: int, batch: int, seed: int) -> list[tuple[Any, Any]]:
    """``n_batches`` batches of real images, decoded and normalised once, held in memory."""
    import torch
    from torchvision import datasets

    from headstart.data import build_transform

    ds = datasets.ImageFolder(str(subset / "train"), transform=build_transform(pre, train=False, augment=False))
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[: n_batches * batch]
    items = [ds[int(i)] for i in order]
    out = []
    for b in range(n_batches):
        chunk = items[b * batch:(b + 1) * batch]
        out.append((torch.stack([x for x, _ in chunk]).contiguous(), torch.tensor([y for _, y in chunk])))
    return out


def hand_model(name: str, weights: str, num_classes: int) -> Any:
    """The same architecture as a plain torchvision / timm module (pretrained weights where local)."""
    from torch import nn

    if name == "tf_efficientnet_lite0":
        import timm

        from headstart.models.weights import efficientnet_lite0_state_dict

        m = timm.create_model(name, num_classes=num_classes)
        state = {k: v for k, v in efficientnet_lite0_state_dict().items() if not k.startswith("classifier.")}
        m.load_state_dict(state, strict=False)
        return m
    import torchvision

    try:
        m = torchvision.models.get_model(name, weights=weights)  # headstart put the file in the hub cache
    except Exception as e:  # noqa: BLE001 - offline: random weights time the same
        common.log(f"hand model: pretrained weights unavailable ({type(e).__name__}); random init")
        m = torchvision.models.get_model(name, weights=None)
    last = m.classifier[-1]
    m.classifier[-1] = nn.Linear(last.in_features, num_classes)
    return m


def main() -> None:
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mobilenet_v2", help="mobilenet_v2 or tf_efficientnet_lite0")
    p.add_argument("--weights", default=None, help="headstart weights (default IMAGENET1K_V1 / DEFAULT)")
    p.add_argument("--size", type=int, default=None, help="input size (default 128; 64 with --quick)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=None, help="steps per contender per round (default 5; 2 quick)")
    p.add_argument("--rounds", type=int, default=None, help="A B rounds after warm-up (default 10; 3 quick)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per contender (default 2)")
    p.add_argument("--bn", choices=("train", "eval-all"), default="train")
    p.add_argument("--lr", type=float, default=3e-4, help="headstart's default fine-tuning lr")
    args = p.parse_args()
    common.setup_torch(args.threads)
    size = args.size or (64 if args.quick else 128)
    steps = args.steps or (2 if args.quick else 5)
    rounds = args.rounds or (3 if args.quick else 10)
    warmup = args.warmup or 2
    weights = args.weights or ("DEFAULT" if args.model.startswith("tf_") else "IMAGENET1K_V1")
    subset = common.subset_for(args, BENCH, 50, 20)

    import torch
    from torch import nn
    from torch.nn.modules.batchnorm import _BatchNorm

    from headstart.config import StageConfig, TrainConfig
    from headstart.models.backbones import build_network
    from headstart.runtime.precision import resolve_precision
    from headstart.training.loop import train_one_epoch
    from headstart.training.optim import apply_stage, build_optimizer, build_scheduler, lr_factor

    device = torch.device("cpu")
    torch.manual_seed(args.seed)
    net = build_network(args.model, weights, num_classes=10, input_size=size)
    stage = StageConfig(name="finetune", epochs=1, freeze="none", lr=args.lr, bn=args.bn)
    apply_stage(net, stage)  # everything trainable, BatchNorm policy
    tc = TrainConfig(precision="fp32")
    total_steps = warmup + rounds * steps
    opt_hs = build_optimizer(net, stage, tc)
    sched_hs = build_scheduler(opt_hs, total_steps, tc)
    precision = resolve_precision(tc.precision, device)

    hand = hand_model(args.model, weights, 10)
    opt_hand = torch.optim.AdamW([{"params": [q for q in hand.parameters() if q.ndim > 1], "weight_decay": 0.01},
                                  {"params": [q for q in hand.parameters() if q.ndim <= 1], "weight_decay": 0.0}],
                                 lr=args.lr)
    sched_hand = torch.optim.lr_scheduler.LambdaLR(opt_hand, lambda s: lr_factor(s, total_steps, tc.warmup))
    loss_hs, loss_hand = nn.CrossEntropyLoss(), nn.CrossEntropyLoss()
    n_hs = sum(q.numel() for q in net.parameters() if q.requires_grad)
    n_hand = sum(q.numel() for q in hand.parameters() if q.requires_grad)
    common.log(f"{args.model} at {size}px, batch {args.batch_size}: trainable parameters headstart {n_hs:,}, "
               f"hand {n_hand:,}; {len(opt_hs.param_groups)} vs {len(opt_hand.param_groups)} parameter groups")

    batches = load_batches(subset, net.preprocessing, steps, args.batch_size, args.seed)

    def run_headstart(bs: list[tuple[Any, Any]]) -> float:
        start = time.perf_counter()
        train_one_epoch(net, bs, opt_hs, sched_hs, loss_hs, device, progress=False, precision=precision,
                        channels_last=False)
        return time.perf_counter() - start

    def run_hand(bs: list[tuple[Any, Any]]) -> float:
        start = time.perf_counter()
        hand.train()
        if args.bn == "eval-all":
            for m in hand.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        running = 0.0
        for x, y in bs:
            logits = hand(x)
            loss = loss_hand(logits, y)
            opt_hand.zero_grad(set_to_none=True)
            loss.backward()
            opt_hand.step()
            sched_hand.step()
            running += loss.item()
        return time.perf_counter() - start

    contenders = {"headstart": run_headstart, "hand": run_hand}
    common.log(f"warm-up: {warmup} step(s) each")
    for fn in contenders.values():
        fn(batches[:warmup])
    ips: dict[str, list[float]] = {"headstart": [], "hand": []}
    n_images = steps * args.batch_size
    probes: list[float] = []
    for r, order in enumerate(common.alternate(rounds, list(contenders))):
        probes.append(common.tiny_op_ms(20))  # contention probe before the round
        for name in order:
            secs = contenders[name](batches)
            ips[name].append(n_images / secs)
        probes[-1] = max(probes[-1], common.tiny_op_ms(20))  # ... and after it
        common.log(f"round {r + 1}/{rounds}: headstart {ips['headstart'][-1]:.2f} img/s, "
                   f"hand {ips['hand'][-1]:.2f} img/s (probe {probes[-1]:.1f} ms)")
    med_hs, med_hand = common.median(ips["headstart"]), common.median(ips["hand"])
    per_round = [a / b for a, b in zip(ips["headstart"], ips["hand"])]
    ratio = common.ratio(med_hs, med_hand)
    quiet = [i for i, pr in enumerate(probes) if pr <= common.QUIET_PROBE_MS]
    quiet_stats: dict[str, Any] = {"quiet_rounds": len(quiet)}
    if quiet:
        q_hs = common.median([ips["headstart"][i] for i in quiet])
        q_hand = common.median([ips["hand"][i] for i in quiet])
        quiet_stats.update(quiet_headstart_images_per_s=q_hs, quiet_hand_images_per_s=q_hand,
                           quiet_ratio=common.ratio(q_hs, q_hand),
                           quiet_ratio_median_per_round=common.median([per_round[i] for i in quiet]))
    common.emit(common.round_floats({
        "benchmark": BENCH,
        "quick": args.quick,
        "model": args.model,
        "weights": weights,
        "input_size": size,
        "batch_size": args.batch_size,
        "precision": "fp32",
        "bn": args.bn,
        "steps_per_round": steps,
        "rounds": rounds,
        "warmup_steps": warmup,
        "headstart_images_per_s": med_hs,
        "hand_images_per_s": med_hand,
        "ratio": ratio,
        "ratio_median_per_round": common.median(per_round),
        "ratio_per_round": per_round,
        "headstart_best_images_per_s": max(ips["headstart"]),
        "hand_best_images_per_s": max(ips["hand"]),
        "ratio_best": common.ratio(max(ips["headstart"]), max(ips["hand"])),
        "headstart_images_per_s_rounds": ips["headstart"],
        "hand_images_per_s_rounds": ips["hand"],
        **quiet_stats,
        "probe_ms_per_round": probes,
        "target_ratio": 0.95,
        "ratio_met": ratio >= 0.95,
        "trainable_params": {"headstart": n_hs, "hand": n_hand},
        "param_groups": {"headstart": len(opt_hs.param_groups), "hand": len(opt_hand.param_groups)},
        "machine": common.machine_info(),
    }))


if __name__ == "__main__":
    main()
