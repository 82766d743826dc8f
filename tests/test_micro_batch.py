"""Micro-batches (``train.micro_batch``): a batch run in chunks must step as the whole batch does.

The chunk size on the CPU comes from ``runtime.chunks.CPU_CHUNK_ELEMENTS``; these tests lower it
so that 32-px images are chunked, and compare against the same batch run whole.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from headstart.cli.main import main
from headstart.evaluation.inference import predict_logits
from headstart.models.backbones import build_network
from headstart.runtime import chunks
from headstart.runtime.chunks import chunk_size, chunked
from headstart.training import fit as fit_module
from headstart.training.loop import chunk_shares, train_one_epoch

CPU = torch.device("cpu")


def test_chunk_size_follows_the_element_budget_on_the_cpu_only():
    image = torch.zeros(64, 3, 224, 224)
    assert chunk_size(image, CPU) == chunks.CPU_CHUNK_ELEMENTS // (3 * 224 * 224) == 5
    assert chunk_size(torch.zeros(64, 3, 128, 128), CPU) == 16
    assert chunk_size(torch.zeros(64, 3, 32, 32), CPU) == 64  # small images: the whole batch
    assert chunk_size(torch.zeros(64, 1280), CPU) == 64  # cached feature vectors are never split
    assert chunk_size(image, torch.device("cuda")) == 64  # a GPU takes the whole batch
    assert chunk_size(image, CPU, 7) == 7  # an explicit size wins everywhere
    assert chunk_size(image, torch.device("cuda"), 7) == 7
    assert chunk_size(image, CPU, 100) == 64


def test_chunk_shares_add_up_to_the_batch_loss_with_class_weights():
    torch.manual_seed(0)
    logits, y = torch.randn(10, 4), torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])
    for loss_fn in (torch.nn.CrossEntropyLoss(), torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0, 5.0, 0.5]))):
        shares = chunk_shares(loss_fn, y, 3)
        assert [s.stop - s.start for s, _ in shares] == [3, 3, 3, 1]
        total = sum(loss_fn(logits[s], y[s]) * share for s, share in shares)
        assert float(total) == pytest.approx(float(loss_fn(logits, y)), rel=1e-6)
    soft = torch.softmax(torch.randn(10, 4), 1)  # mixup's labels: a plain mean over the batch
    shares = chunk_shares(torch.nn.CrossEntropyLoss(), soft, 4)
    total = sum(torch.nn.functional.cross_entropy(logits[s], soft[s]) * share for s, share in shares)
    assert float(total) == pytest.approx(float(torch.nn.functional.cross_entropy(logits, soft)), rel=1e-6)


def _epoch(net, micro_batch, bn_policy, class_weights=None):
    net = copy.deepcopy(net)
    net.bn_policy = bn_policy
    torch.manual_seed(1)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 3, (16,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    loss_fn = torch.nn.CrossEntropyLoss(weight=class_weights)
    sizes = []  # the images each forward pass saw
    net.body.register_forward_pre_hook(lambda m, i: sizes.append(len(i[0])))
    stats = train_one_epoch(net, loader, opt, sched, loss_fn, CPU, progress=False, channels_last=True,
                            micro_batch=micro_batch)
    stats.sizes = sizes
    return net, stats


def _max_difference(a, b) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 images at 32 px (the real budget chunks only larger images)."""
    monkeypatch.setattr(chunks, "CPU_CHUNK_ELEMENTS", 3 * 3 * 32 * 32)


def test_chunked_steps_equal_whole_batch_steps_with_batchnorm_held(small_chunks):
    torch.manual_seed(0)
    net = build_network("resnet18", "none", num_classes=3, input_size=32)
    weights = torch.tensor([1.0, 2.0, 0.5])
    whole, s_whole = _epoch(net, 8, "eval-all", weights)
    auto, s_auto = _epoch(net, None, "eval-all", weights)  # chunks of 3, 3 and 2 of each batch of 8
    assert s_whole.sizes == [8, 8] and s_auto.sizes == [3, 3, 2, 3, 3, 2]
    assert _max_difference(whole, auto) < 1e-5
    assert _max_difference(whole, net) > 1e-3  # it trained
    assert s_auto.loss == pytest.approx(s_whole.loss, rel=1e-5)
    assert s_auto.accuracy == s_whole.accuracy and s_auto.images == s_whole.images == 16


def test_auto_leaves_batches_whole_while_batchnorm_updates(small_chunks):
    torch.manual_seed(0)
    net = build_network("resnet18", "none", num_classes=3, input_size=32)
    whole, _ = _epoch(net, 8, "train")
    auto, s_auto = _epoch(net, None, "train")
    forced, s_forced = _epoch(net, 3, "train")  # explicit: each chunk normalised by its own statistics
    assert s_auto.sizes == [8, 8] and s_forced.sizes == [3, 3, 2, 3, 3, 2]
    assert _max_difference(whole, auto) == 0
    assert _max_difference(whole, forced) > 1e-4


def test_predictions_in_chunks_equal_the_whole_batch(small_chunks):
    torch.manual_seed(0)
    net = build_network("resnet18", "none", num_classes=3, input_size=32).eval()
    loader = DataLoader(TensorDataset(torch.randn(10, 3, 32, 32), torch.arange(10) % 3), batch_size=10)
    calls = []
    net.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    auto, targets = predict_logits(net, loader, CPU)
    assert calls == [3, 3, 3, 1]
    whole, _ = predict_logits(net, loader, CPU, micro_batch=10)
    assert torch.allclose(auto, whole, atol=1e-5) and targets.tolist() == (torch.arange(10) % 3).tolist()
    assert torch.equal(chunked(lambda t: t * 2, torch.arange(7.0), 3), torch.arange(7.0) * 2)


def test_the_micro_batch_flag_reaches_the_training_loop(tmp_path, monkeypatch, capsys):
    seen = []
    real = fit_module.train_one_epoch

    def spy(*args, **kwargs):
        seen.append(kwargs["micro_batch"])
        return real(*args, **kwargs)

    monkeypatch.setattr(fit_module, "train_one_epoch", spy)
    argv = ["train", "--model", "resnet18", "--weights", "none", "--input-size", "32", "--data", "digits",
            "--limit-train", "32", "--limit-val", "16", "--batch-size", "16", "--epochs", "1", "--no-progress",
            "--device", "cpu", "--output", str(tmp_path), "--name", "mb", "--no-cache", "--micro-batch", "4"]
    assert main(argv) == 0
    assert seen == [4]
    assert main([*argv[:-1], "0"]) == 2
    assert "train.micro_batch (--micro-batch) is 0" in capsys.readouterr().err
