"""torchrun: two gloo processes on the CPU train like one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from torch.utils.data import SequentialSampler

from headstart.cli.main import main
from headstart.runtime.distributed import ShardSampler, World

ARGS = ["--model", "resnet18", "--weights", "none", "--input-size", "32", "--limit-train", "64", "--limit-val",
        "32", "--batch-size", "16", "--epochs", "2", "--finetune-epochs", "2", "--no-augment", "--no-progress",
        "--no-report", "--no-tensorboard"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_shards_cover_the_permutation_once_per_rank_step():
    base = SequentialSampler(range(10))
    shards = [list(ShardSampler(base, World(r, 2))) for r in range(2)]
    assert shards == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]
    odd = [list(ShardSampler(SequentialSampler(range(5)), World(r, 2))) for r in range(2)]
    assert [len(s) for s in odd] == [3, 3] and sorted(sum(odd, [])) == [0, 0, 1, 2, 3, 4]


def test_two_process_gloo_run_matches_one_process(tmp_path):
    # A model without dropout (resnet18's new head is one Linear) and no augmentation, so the
    # only difference is that each process computes half of every global batch.
    assert main(["train", *ARGS, "--output", str(tmp_path), "--name", "one"]) == 0
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "headstart", "train", *ARGS, "--output", str(tmp_path),
           "--name", "two"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(a)), (one, two)
    # Only rank 0 wrote: the runs are "one" and "two", with no extra folder made by rank 1.
    runs = sorted(p.name for p in tmp_path.iterdir() if (p / "config.yaml").exists())
    assert runs == ["one", "two"]
