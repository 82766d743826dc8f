"""Tests for headstart.models.checkpoint: safe, self-contained, atomically written checkpoints.

A tiny random-weight resnet18 (32 px, 64 digits) is trained once per module; nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from headstart.config import HeadConfig, RunConfig, apply_overrides, from_dict, to_dict
from headstart.errors import HeadstartError
from headstart.jobs.train import prepare
from headstart.models import checkpoint
from headstart.training.fit import fit
from headstart.training.runs import RunDir


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(trained network, run folder, config): one head epoch with an MLP head with BatchNorm and dropout."""
    root = tmp_path_factory.mktemp("ckpt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = apply_overrides(RunConfig(), {
        "model.name": "resnet18", "model.weights": "none", "model.input_size": 32,
        "head.kind": "mlp", "head.hidden": "16", "head.batchnorm": True, "head.dropout": 0.1,
        "data.source": "digits", "data.limit_train": 64, "data.limit_val": 32, "data.batch_size": 16,
        "train.epochs": 1, "train.progress": False, "train.device": "cpu",
        "cache.dir": str(root / "cache"), "output": str(root), "name": "run",
    })
    net, data = prepare(cfg)
    run = RunDir.new(cfg)
    run.write_config(cfg)
    fit(net, data, cfg, run, say=lambda s: None)
    torch.set_num_threads(threads)
    return net, run.path, cfg


def test_checkpoint_loads_weights_only_and_is_self_contained(trained):
    net, run, cfg = trained
    ckpt = torch.load(run / "best.pt", weights_only=True)
    assert ckpt["format"] == "headstart-checkpoint/1"
    assert ckpt["arch"] == "resnet18"
    assert ckpt["classes"] == [str(i) for i in range(10)]
    assert ckpt["num_classes"] == 10
    assert ckpt["kind"] == "digits"
    assert ckpt["preprocessing"]["crop"] == 32
    assert len(ckpt["preprocessing"]["mean"]) == 3 and len(ckpt["preprocessing"]["std"]) == 3
    assert ckpt["head"] == {"kind": "mlp", "hidden": [16], "dropout": 0.1, "activation": "relu",
                            "batchnorm": True}
    assert from_dict(RunConfig, ckpt["config"]) == cfg
    assert ckpt["metrics"]["epoch"] == 1
    sd = ckpt["state_dict"]
    assert set(sd) == set(net.state_dict())
    assert all(t.device.type == "cpu" for t in sd.values())
    # the head's BatchNorm statistics trained and were saved
    bn_means = [k for k in sd if k.startswith("head.") and k.endswith("running_mean")]
    assert len(bn_means) == 1 and not torch.equal(sd[bn_means[0]], torch.zeros(16))

    last = torch.load(run / "last.pt", weights_only=True)
    assert last["train_state"]["global_epoch"] == 1
    assert "state" in last["train_state"]["optimizer"] and "param_groups" in last["train_state"]["optimizer"]


def test_load_network_reproduces_the_trained_model(trained):
    net, run, cfg = trained
    loaded, ckpt = checkpoint.load_network(run / "best.pt")
    assert loaded.name == "resnet18" and loaded.num_classes == 10
    assert loaded.head_config == cfg.head
    assert loaded.preprocessing.to_dict() == net.preprocessing.to_dict()
    assert not loaded.training
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 32, 32, generator=gen)
    # Training ran channels-last (the default); the checkpoint holds the standard layout. In the same
    # layout the same weights give the same logits to the bit.
    net.cpu().eval().to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        expected, got = net(x), loaded(x)
    assert torch.equal(expected, got)
    assert all(t.is_contiguous() for t in ckpt["state_dict"].values())
    # a run folder means its best checkpoint; a dict is used as is
    again, _ = checkpoint.load_network(run)
    with torch.no_grad():
        assert torch.equal(again(x), expected)
    from_dict_net, _ = checkpoint.load_network(ckpt)
    with torch.no_grad():
        assert torch.equal(from_dict_net(x), expected)


def test_torn_and_garbage_files_are_headstart_errors(trained, tmp_path):
    _, run, _ = trained
    data = (run / "best.pt").read_bytes()
    torn = tmp_path / "torn.pt"
    torn.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(4096))
    for path in (torn, garbage):
        with pytest.raises(HeadstartError, match="cannot read checkpoint"):
            checkpoint.read(path)
        with pytest.raises(HeadstartError):
            checkpoint.load_network(path)
    with pytest.raises(HeadstartError, match="does not exist"):
        checkpoint.read(tmp_path / "missing.pt")


def test_a_foreign_torch_file_is_not_a_checkpoint(tmp_path):
    other = tmp_path / "weights.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(HeadstartError, match="not a headstart checkpoint"):
        checkpoint.read(other)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": checkpoint.FORMAT, "obj": HeadConfig()}, pickled)  # needs unpickling code
    with pytest.raises(HeadstartError, match="cannot read checkpoint"):
        checkpoint.read(pickled)


def test_save_writes_a_complete_file_and_no_temporaries(tmp_path):
    target = tmp_path / "sub" / "best.pt"
    payload = {"format": checkpoint.FORMAT, "x": torch.arange(4), "config": to_dict(RunConfig())}
    assert checkpoint.save(target, payload) == target
    assert [p.name for p in target.parent.iterdir()] == ["best.pt"]
    back = checkpoint.read(target)
    assert torch.equal(back["x"], torch.arange(4)) and back["config"] == payload["config"]


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_save_is_atomic_when_writing_fails_midway(tmp_path, monkeypatch, exc):
    target = tmp_path / "last.pt"
    checkpoint.save(target, {"format": checkpoint.FORMAT, "v": torch.tensor([1.0, 2.0])})
    before = target.read_bytes()
    real_save = torch.save

    def dies_midway(obj, f, *args, **kwargs):
        real_save({"format": checkpoint.FORMAT, "v": torch.zeros(1000)}, f)  # bytes hit the file...
        f.write(b"\0" * 100)
        raise exc  # ...and then the write fails

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(type(exc)):
        checkpoint.save(target, {"format": checkpoint.FORMAT, "v": torch.tensor([3.0])})
    monkeypatch.setattr(torch, "save", real_save)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert torch.equal(checkpoint.read(target)["v"], torch.tensor([1.0, 2.0]))


FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_a_checkpoint_written_before_the_layout_move_still_loads_and_predicts_the_same():
    # Written by the flat-layout code (commit 6a2c34b): a 1-epoch squeezenet1_1 on digits at
    # 32 px, with the logits that code gave for a fixed input.
    import headstart as hs

    net, ckpt = hs.load_network(FIXTURES / "flat-layout-squeezenet.pt")
    expected = torch.load(FIXTURES / "flat-layout-squeezenet-logits.pt", weights_only=True)
    net.eval()
    with torch.no_grad():
        got = net(expected["input"])
    assert ckpt["arch"] == "squeezenet1_1" and len(ckpt["classes"]) == 10
    torch.testing.assert_close(got, expected["logits"], rtol=0, atol=1e-6)
