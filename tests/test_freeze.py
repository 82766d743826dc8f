"""Tests for headstart.models.freeze: freeze specs, unfreezing, the BatchNorm policy in train mode,
and the per-group reports. Small random-weight networks at 32-64 px keep it fast."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from headstart.config import HeadConfig
from headstart.errors import HeadstartError
from headstart.models.backbones import build_network
from headstart.models.freeze import bn_mode, count_params, freeze, trainable_state, unfreeze_last

RESNET_GROUPS = ["stem", "layer1", "layer2", "layer3", "layer4"]
# resnet18 with a 7-class fc: 11,689,512 - 513,000 (1000-class fc) + 3,591 (7-class fc).
R18_TOTAL, R18_HEAD = 11_180_103, 3_591
R18_STEM_LAYER1 = 9_408 + 128 + 2 * (2 * 36_864 + 2 * 128)  # conv1 + bn1 + two BasicBlocks


@pytest.fixture(scope="module")
def _resnet18():
    torch.manual_seed(0)
    return build_network("resnet18", weights="none", num_classes=7, input_size=32)


@pytest.fixture
def r18(_resnet18):
    """A fresh copy of a random-weight resnet18 with a 7-class head (cheaper than rebuilding)."""
    net = copy.deepcopy(_resnet18)
    net.train()
    return net


def _trainable(net):
    return {n for n, p in net.named_parameters() if p.requires_grad}


def _frozen(net):
    return {n for n, p in net.named_parameters() if not p.requires_grad}


def _in(names, *prefixes):
    return {n for n in names if n.startswith(prefixes)}


# ------------------------------------------------------------------ freeze specs


def test_freeze_body(r18):
    freeze(r18, "body")
    assert _trainable(r18) == {"head.weight", "head.bias"}
    assert trainable_state(r18) == {**{g: "frozen" for g in RESNET_GROUPS}, "head": "trainable"}
    assert count_params(r18) == (R18_TOTAL, R18_HEAD)


def test_freeze_none_and_refreeze(r18):
    freeze(r18, "body")
    freeze(r18, "none")  # every call starts from "all trainable"
    assert _frozen(r18) == set()
    assert set(trainable_state(r18).values()) == {"trainable"}
    assert count_params(r18) == (R18_TOTAL, R18_TOTAL)
    freeze(r18, "body")
    freeze(r18, "")
    assert _frozen(r18) == set()


@pytest.mark.parametrize("spec", ["first:2", "2", " first:2 "])
def test_freeze_first_k(r18, spec):
    freeze(r18, spec)
    names = [n for n, _ in r18.named_parameters()]
    assert _frozen(r18) == _in(names, "body.conv1.", "body.bn1.", "body.layer1.")
    assert trainable_state(r18) == {
        "stem": "frozen", "layer1": "frozen", "layer2": "trainable", "layer3": "trainable",
        "layer4": "trainable", "head": "trainable",
    }
    assert count_params(r18) == (R18_TOTAL, R18_TOTAL - R18_STEM_LAYER1)


def test_freeze_first_k_bounds(r18):
    freeze(r18, "first:0")
    assert _frozen(r18) == set()
    freeze(r18, "first:5")  # all groups: same as "body"
    assert _trainable(r18) == {"head.weight", "head.bias"}
    with pytest.raises(HeadstartError, match="5 depth groups"):
        freeze(r18, "first:99")
    with pytest.raises(HeadstartError):
        freeze(r18, "6")
    with pytest.raises(HeadstartError):
        freeze(r18, "first:-1")


def test_freeze_patterns(r18):
    freeze(r18, "body.layer1.*, body.conv1.*")
    names = [n for n, _ in r18.named_parameters()]
    assert _frozen(r18) == _in(names, "body.layer1.", "body.conv1.")
    state = trainable_state(r18)
    assert state["stem"] == "partial" and state["layer1"] == "frozen" and state["layer2"] == "trainable"
    freeze(r18, "head.*")
    assert _frozen(r18) == {"head.weight", "head.bias"} and trainable_state(r18)["head"] == "frozen"
    freeze(r18, "*.bn?.*")  # every BatchNorm of the blocks
    assert _frozen(r18) == {n for n in names if ".bn1." in n or ".bn2." in n}


def test_pattern_matching_nothing_is_an_error(r18):
    with pytest.raises(HeadstartError, match="match no parameter") as e:
        freeze(r18, "features.*")
    assert "body." in str(e.value)  # shows what names look like


def test_unfreeze_last(r18):
    assert unfreeze_last(r18, 2) == "first:3"
    assert unfreeze_last(r18, "2") == "first:3"
    assert unfreeze_last(r18, 0) == "first:5"
    assert unfreeze_last(r18, 10) == "first:0"
    assert unfreeze_last(r18, "all") == "none"
    with pytest.raises(HeadstartError):
        unfreeze_last(r18, -1)
    freeze(r18, unfreeze_last(r18, 2))
    assert [g for g, s in trainable_state(r18).items() if s == "trainable"] == ["layer3", "layer4", "head"]


# ------------------------------------------------------------------ BatchNorm policy


def _bn_stats(module):
    return {
        f"{n}.{b}": getattr(m, b).clone()
        for n, m in module.named_modules()
        if isinstance(m, _BatchNorm)
        for b in ("running_mean", "running_var", "num_batches_tracked")
    }


def _train_steps(net, steps=3, size=32):
    torch.manual_seed(1)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    for _ in range(steps):
        net.train()
        x, y = torch.randn(4, 3, size, size) * 3 + 1, torch.randint(0, 7, (4,))
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()


def _changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_frozen_body_keeps_batchnorm_statistics(r18):
    freeze(r18, "body")
    stats, head = _bn_stats(r18.body), copy.deepcopy(r18.head.state_dict())
    assert len(stats) == 3 * 20  # resnet18 has 20 BatchNorm layers
    _train_steps(r18)
    assert _changed(stats, _bn_stats(r18.body)) == set()
    assert _changed(head, r18.head.state_dict()) == {"weight", "bias"}


def test_train_policy_updates_batchnorm_statistics(r18):
    """The same run with policy ``train``: the statistics move (so the test above can fail)."""
    freeze(r18, "body")
    r18.bn_policy = "train"
    stats = _bn_stats(r18.body)
    _train_steps(r18)
    assert _changed(stats, _bn_stats(r18.body)) == set(stats)


def test_first_k_frozen_keeps_only_the_frozen_groups_statistics(r18):
    freeze(r18, "first:2")
    stats, params = _bn_stats(r18.body), copy.deepcopy(r18.body.state_dict())
    _train_steps(r18)
    changed = _changed(stats, _bn_stats(r18.body))
    early = {k for k in stats if k.startswith(("bn1.", "layer1."))}
    assert early and not (changed & early)
    late = {k for k in stats if k.startswith("layer4.")}
    assert late <= changed
    assert "layer4.1.conv2.weight" in _changed(params, r18.body.state_dict())
    assert "layer1.0.conv1.weight" not in _changed(params, r18.body.state_dict())


def test_eval_all_keeps_every_statistic_while_weights_train(r18):
    freeze(r18, "none")
    r18.bn_policy = "eval-all"
    stats, params = _bn_stats(r18.body), copy.deepcopy(r18.body.state_dict())
    _train_steps(r18)
    assert _changed(stats, _bn_stats(r18.body)) == set()
    assert "conv1.weight" in _changed(params, r18.body.state_dict())


def test_train_mode_is_reapplied_after_eval(r18):
    freeze(r18, "body")
    r18.eval()
    r18.train()
    assert not r18.body.training and r18.head.training
    assert not any(m.training for m in r18.body.modules())
    freeze(r18, "none")
    r18.train()  # nothing frozen any more: the body trains again
    assert all(m.training for m in r18.modules())


def test_unknown_policy_is_an_error(r18):
    r18.bn_policy = "sometimes"
    with pytest.raises(HeadstartError, match="BatchNorm policy"):
        r18.train()


@pytest.mark.parametrize("name", ["googlenet", "efficientnet_b0"])
def test_frozen_body_has_no_dropout_in_train_mode(name):
    torch.manual_seed(0)
    net = build_network(name, weights="none", num_classes=7, input_size=64)
    x = torch.randn(2, 3, 64, 64)
    freeze(net, "body")
    net.train()
    with torch.no_grad():
        assert torch.equal(net.features(x), net.features(x))
    assert any(m.training for m in net.head.modules())  # the head still trains (its dropout too)
    net.bn_policy = "train"  # same body, train mode everywhere: dropout / stochastic depth on
    net.train()
    with torch.no_grad():
        assert not torch.equal(net.features(x), net.features(x))


# ------------------------------------------------------------------ reports


def test_bn_mode_report(r18):
    freeze(r18, "body")
    assert bn_mode(r18) == {**{g: "eval" for g in RESNET_GROUPS}, "head": "-"}
    freeze(r18, "first:2")
    assert bn_mode(r18) == {
        "stem": "eval", "layer1": "eval", "layer2": "train", "layer3": "train", "layer4": "train", "head": "-",
    }
    freeze(r18, "body.layer4.0.bn1.*")
    assert bn_mode(r18)["layer4"] == "mixed"
    assert trainable_state(r18)["layer4"] == "partial"
    freeze(r18, "none")
    r18.bn_policy = "train"
    assert set(bn_mode(r18).values()) == {"train", "-"}


def test_bn_mode_with_a_batchnorm_head_and_eval_all(r18):
    r18.replace_head(7, HeadConfig(kind="mlp", hidden=[16], batchnorm=True))
    freeze(r18, "body")
    assert bn_mode(r18)["head"] == "train"
    r18.bn_policy = "eval-all"
    assert bn_mode(r18) == {**{g: "eval" for g in RESNET_GROUPS}, "head": "eval"}


def test_bn_mode_mixed_head(r18):
    r18.replace_head(7, HeadConfig(kind="mlp", hidden=[16, 8], batchnorm=True))
    freeze(r18, "head.1.*")  # the first BatchNorm1d only
    r18.train()
    assert not r18.head[1].training and r18.head[4].training
    assert bn_mode(r18)["head"] == "mixed"


def test_bn_mode_leaves_the_mode_alone(r18):
    freeze(r18, "first:2")
    r18.eval()
    bn_mode(r18)
    assert not any(m.training for m in r18.modules())
    r18.train()
    bn_mode(r18)
    assert r18.body.layer4.training and not r18.body.layer1.training


def test_count_params_on_plain_modules():
    m = torch.nn.Sequential(torch.nn.Linear(10, 5), torch.nn.Linear(5, 2))
    m[0].requires_grad_(False)
    assert count_params(m) == (55 + 12, 12)


# ------------------------------------------------------------------ timm groups


@pytest.fixture(scope="module")
def lite0():
    torch.manual_seed(0)
    return build_network("tf_efficientnet_lite0", weights="none", num_classes=5)


def test_timm_first_k_freezes_its_groups(lite0):
    net = copy.deepcopy(lite0)
    freeze(net, "first:2")
    state = trainable_state(net)
    assert state["stem"] == state["stage1"] == "frozen"
    assert all(s == "trainable" for g, s in state.items() if g not in ("stem", "stage1"))
    early = ("stem", "stage1")
    assert _frozen(net) == {"body." + n for n, _ in net.body.named_parameters() if net.group_of(n) in early}
    net.train()
    assert not net.body.bn1.training and not net.body.blocks[0][0].bn1.training
    assert net.body.blocks[-1][0].bn1.training


def test_timm_bn_mode_sees_its_batchnorms(lite0):
    net = copy.deepcopy(lite0)
    freeze(net, "first:2")
    modes = bn_mode(net)
    assert modes["stem"] == "eval" and modes["stage1"] == "eval"
    assert modes[net.groups[-1].name] == "train"
