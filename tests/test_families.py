"""Tests for headstart.models.backbones / families / network: every torchvision classifier gets a body,
a replaceable head and ordered depth groups; heads, weights files and the timm path.

Everything is built with random weights at tiny inputs, so nothing is downloaded.
"""

from __future__ import annotations

import copy
import typing

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torchvision.models import get_model_builder

from headstart.config import HeadConfig
from headstart.errors import HeadstartError
from headstart.models.backbones import build_network
from headstart.models.families import FAMILIES
from headstart.models.freeze import count_params, freeze

ALL_MODELS = torchvision.models.list_models(module=torchvision.models)

# Variants that take well over a second to build and run on a quiet 2-core CPU (2-7 s, and 3 s+ as
# soon as the machine is shared; vgg* and the >100M-parameter models also need GBs of memory).
# Every family keeps at least one member in the default suite (test_default_suite_covers_...).
SLOW = {
    "convnext_base", "convnext_large", "wide_resnet101_2",
    "regnet_x_32gf", "regnet_y_32gf", "regnet_y_128gf",
    "swin_b", "swin_v2_b", "vit_l_16", "vit_l_32", "vit_h_14", "efficientnet_v2_l",
    "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
}

# Name prefixes that must each keep a member in the default (not slow) selection.
SUBFAMILIES = [
    "alexnet", "vgg", "resnet", "resnext", "wide_resnet", "densenet", "squeezenet", "inception_v3",
    "googlenet", "mobilenet_v2", "mobilenet_v3", "mnasnet", "shufflenet_v2", "efficientnet_b",
    "efficientnet_v2", "regnet_x", "regnet_y", "convnext", "vit_", "swin_", "swin_v2", "maxvit",
]


def input_size(name: str) -> int:
    if name.startswith("inception"):
        return 75
    if name.startswith("maxvit"):
        return 224
    if name.startswith("vit_h_14"):
        return 28
    if name.startswith("vit_"):
        return 32
    return 64


def model_class(name: str) -> str:
    """The class a torchvision builder returns, read from its annotation (nothing is built)."""
    return typing.get_type_hints(get_model_builder(name))["return"].__name__


def _params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


# ------------------------------------------------------------------ coverage of the zoo


def test_default_suite_covers_every_family():
    assert len(ALL_MODELS) == 80
    assert set(ALL_MODELS) >= SLOW, SLOW - set(ALL_MODELS)
    classes = {model_class(n) for n in ALL_MODELS}
    assert classes == set(FAMILIES), "every torchvision class needs a family entry (and no stale ones)"
    default = [n for n in ALL_MODELS if n not in SLOW]
    assert {model_class(n) for n in default} == set(FAMILIES)
    for prefix in SUBFAMILIES:
        assert any(n.startswith(prefix) for n in default), f"no {prefix}* model in the default suite"


# ------------------------------------------------------------------ every model


def _check_groups(net, x) -> None:
    """Groups are non-empty, own every body parameter exactly once, and run in input order."""
    groups = net.groups
    assert len(groups) >= 3
    assert len({g.name for g in groups}) == len(groups)
    body_params = [n for n, _ in net.body.named_parameters()]
    for n in body_params:
        owners = [g.name for g in groups if g.owns(n)]
        assert len(owners) == 1, f"{n} belongs to {owners}"
    for g in groups:
        assert g.prefixes and any(g.owns(n) for n in body_params), f"group {g.name} is empty"

    # Order: every module of group i finishes before any module of group i+1 starts.
    events: list[tuple[str, str]] = []
    handles = []
    for g in groups:
        for m in net.group_modules(g):
            handles.append(m.register_forward_pre_hook(lambda *_, g=g.name: events.append(("start", g))))
            handles.append(m.register_forward_hook(lambda *_, g=g.name: events.append(("end", g))))
    try:
        net.eval()
        with torch.no_grad():
            out = net(x)
    finally:
        for h in handles:
            h.remove()
    names = [g.name for g in groups]
    seen = [names.index(g) for _, g in events]
    assert set(seen) == set(range(len(groups))), "a group never ran"
    assert seen == sorted(seen), f"groups ran out of order: {[names[i] for i in seen]}"
    assert out.shape == (x.shape[0], 7)


def _check_chain(net, x, name) -> None:
    """The step chain (for the prefix feature cache) computes exactly what the body computes."""
    if name in ("inception_v3", "googlenet"):  # aux classifiers branch off mid-body: no chain
        assert net.chain is None
        return
    assert net.chain, f"{name} has no step chain"
    owned = [p for s in net.chain for p in s.prefixes]
    for n, _ in net.body.named_parameters():
        assert any(n == p or n.startswith(p + ".") for p in owned), f"{n} is in no step"
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net.run_steps(x), net.features(x), rtol=1e-5, atol=1e-5)
        cut = len(net.chain) // 2  # any cut: the first part's output feeds the rest
        torch.testing.assert_close(net.run_steps(net.run_steps(x, 0, cut), cut), net.features(x),
                                   rtol=1e-5, atol=1e-5)
    freeze(net, f"first:{len(net.groups) - 1}")  # the last group trains: the rest is a prefix
    assert 0 < net.frozen_prefix() < len(net.chain)
    freeze(net, "body")


@pytest.mark.parametrize("name", _params(ALL_MODELS))
def test_every_torchvision_model(name):
    torch.manual_seed(0)
    size = input_size(name)
    net = build_network(name, weights="none", num_classes=7, input_size=size)
    assert net.num_classes == 7
    freeze(net, "body")

    head_names = {n for n, _ in net.named_parameters() if n.startswith("head.")}
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert head_names and trainable == head_names

    x = torch.randn(2, 3, size, size)
    net.train()
    logits, aux = net.forward_train(x)
    assert logits.shape == (2, 7)
    loss = F.cross_entropy(logits, torch.tensor([0, 6]))
    loss.backward()
    for n, p in net.named_parameters():
        if n.startswith("head."):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, f"{n} got a gradient"

    _check_groups(net, x)  # runs the eval-mode forward: output (2, 7)
    _check_chain(net, x, name)

    if name == "inception_v3":
        assert net.aux == ["AuxLogits.fc"]
        assert net.body.AuxLogits.fc.out_features == 7
        # The aux classifier reads Mixed_6e's 17x17 map (a 299 px input); run it on its own.
        net.body.AuxLogits.eval()
        assert net.body.AuxLogits(torch.randn(2, 768, 17, 17)).shape == (2, 7)
    if name == "googlenet":
        assert net.aux == ["aux1.fc2", "aux2.fc2"]
        assert net.body.aux1.fc2.out_features == 7 and net.body.aux2.fc2.out_features == 7


def test_googlenet_aux_logits_train_with_the_body():
    torch.manual_seed(0)
    net = build_network("googlenet", weights="none", num_classes=7, input_size=64)
    x = torch.randn(2, 3, 64, 64)
    freeze(net, "none")
    net.train()
    logits, aux = net.forward_train(x)
    assert logits.shape == (2, 7)
    assert [a.shape for a in aux] == [(2, 7), (2, 7)]
    # A frozen body runs in eval mode: no auxiliary logits to compute.
    freeze(net, "body")
    net.train()
    assert net.forward_train(x)[1] == []


# ------------------------------------------------------------------ heads


@pytest.fixture(scope="module")
def vgg16():
    """VGG16 with its (random) 1000-class classifier, plus a copy of that classifier."""
    torch.manual_seed(0)
    net = build_network("vgg16", weights="none", input_size=32)
    return net, copy.deepcopy(net.head)


def test_replace_head_vgg16_swaps_only_the_last_layer(vgg16):
    net, original = vgg16
    assert original[6].out_features == 1000  # the built (random) ImageNet classifier
    net.replace_head(10)
    assert net.num_classes == 10
    assert isinstance(net.head[6], nn.Linear)
    assert (net.head[6].in_features, net.head[6].out_features) == (4096, 10)
    assert [type(m) for m in net.head] == [type(m) for m in original]
    for i in (0, 3):  # the two pretrained Linear layers are kept, weights and all
        assert torch.equal(net.head[i].weight, original[i].weight)
        assert torch.equal(net.head[i].bias, original[i].bias)
    freeze(net, "body")
    assert count_params(net) == (134_301_514, 119_586_826)
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_replace_again_starts_from_the_pretrained_classifier(vgg16):
    net, original = vgg16
    net.replace_head(10)
    with torch.no_grad():
        net.head[0].weight.add_(1.0)  # "training" the head
    net.replace_head(3)
    assert net.head[6].out_features == 3
    assert torch.equal(net.head[0].weight, original[0].weight)
    assert net.head[0].weight is not original[0].weight


MLP = HeadConfig(kind="mlp", hidden=[32, 16], dropout=0.2, batchnorm=True, activation="gelu")


@pytest.fixture(scope="module", params=[("squeezenet1_1", "map"), ("convnext_tiny", "pooled"), ("resnet18", "flat")])
def layout_net(request):
    name, layout = request.param
    torch.manual_seed(0)
    net = build_network(name, weights="none", input_size=32)
    assert net.layout == layout
    return net


@pytest.mark.parametrize("cfg", [HeadConfig(kind="linear"), HeadConfig(kind="linear", dropout=0.3), MLP],
                         ids=["linear", "linear-dropout", "mlp"])
def test_new_heads_fit_every_body_layout(layout_net, cfg):
    net = layout_net
    net.replace_head(7, cfg)
    x = torch.randn(2, 3, 32, 32)
    feats = net.features(x)
    assert feats.shape[1] == net.feature_dim
    linears = [m for m in net.head.modules() if isinstance(m, nn.Linear)]
    widths = [(m.in_features, m.out_features) for m in linears]
    if cfg.kind == "linear":
        assert widths == [(net.feature_dim, 7)]
    else:
        assert widths == [(net.feature_dim, 32), (32, 16), (16, 7)]
        assert sum(isinstance(m, nn.BatchNorm1d) for m in net.head.modules()) == 2
        assert sum(isinstance(m, nn.GELU) for m in net.head.modules()) == 2
    assert any(isinstance(m, nn.Dropout) for m in net.head.modules()) == bool(cfg.dropout)
    net.train()
    assert net(x).shape == (2, 7)
    net.eval()
    with torch.no_grad():
        assert torch.allclose(net.forward_head(net.features(x)), net(x))
        assert net.forward_head(feats).shape == (2, 7)


def test_head_config_errors():
    torch.manual_seed(0)
    net = build_network("resnet18", weights="none", input_size=32)
    with pytest.raises(HeadstartError, match="no hidden layers"):
        net.replace_head(7, HeadConfig(kind="linear", hidden=[8]))
    with pytest.raises(HeadstartError, match="unknown activation"):
        net.replace_head(7, HeadConfig(kind="mlp", hidden=[8], activation="swish"))
    with pytest.raises(HeadstartError, match="unknown head kind"):
        net.replace_head(7, HeadConfig(kind="conv"))
    with pytest.raises(HeadstartError, match="at least 2 classes"):
        net.replace_head(1)


def test_squeezenet_replace_keeps_the_conv_classifier():
    torch.manual_seed(0)
    net = build_network("squeezenet1_1", weights="none", input_size=32)
    before = copy.deepcopy(net.head)
    net.replace_head(5)
    conv = net.head[1]
    assert isinstance(conv, nn.Conv2d) and conv.out_channels == 5 and conv.in_channels == 512
    assert [type(m) for m in net.head] == [type(m) for m in before]
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 5)


# ------------------------------------------------------------------ names and weights


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(HeadstartError) as e:
        build_network("resnet5", weights="none")
    msg = str(e.value)
    assert "resnet5" in msg and ("resnet50" in msg or "resnet18" in msg)


def test_unknown_weights_name_lists_the_available_ones():
    with pytest.raises(HeadstartError) as e:
        build_network("resnet18", weights="IMAGENET9K_V7")
    msg = str(e.value)
    assert "IMAGENET9K_V7" in msg and "IMAGENET1K_V1" in msg and "DEFAULT" in msg


def test_missing_weights_file_is_an_error(tmp_path):
    with pytest.raises(HeadstartError, match="does not exist"):
        build_network("resnet18", weights=str(tmp_path / "nope.pth"))


@pytest.fixture(scope="module")
def resnet18_state():
    torch.manual_seed(1)
    return torchvision.models.resnet18(weights=None).state_dict()


def _save(state, path):
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def _assert_loaded(net, state, final="fc."):
    body, head = net.body.state_dict(), net.head.state_dict()
    for k, v in state.items():
        if k.startswith(final):
            assert torch.equal(head[k[len(final):]], v), k
        else:
            assert torch.equal(body[k], v), k


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_file_loads(tmp_path, resnet18_state, suffix):
    path = _save(resnet18_state, tmp_path / f"r18{suffix}")
    torch.manual_seed(2)  # different from the file's seed: equality proves the load
    net = build_network("resnet18", weights=str(path))
    _assert_loaded(net, resnet18_state)


def test_wrapped_and_dataparallel_state_dict_loads(tmp_path, resnet18_state):
    wrapped = {"state_dict": {"module." + k: v for k, v in resnet18_state.items()}, "epoch": 3}
    path = tmp_path / "ckpt.pt"
    torch.save(wrapped, path)
    net = build_network("resnet18", weights=str(path), num_classes=7)
    body = net.body.state_dict()
    for k, v in resnet18_state.items():
        if not k.startswith("fc."):
            assert torch.equal(body[k], v), k
    assert net.head.out_features == 7


def test_weights_file_for_another_architecture_names_the_keys(tmp_path, resnet18_state):
    r34 = _save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(HeadstartError) as e:
        build_network("resnet18", weights=str(r34))
    msg = str(e.value)
    assert "unexpected" in msg and "layer1.2." in msg and "another architecture" in msg

    r18 = _save(resnet18_state, tmp_path / "r18.pth")
    with pytest.raises(HeadstartError) as e:
        build_network("resnet34", weights=str(r18))
    msg = str(e.value)
    assert "missing" in msg and "layer1.2." in msg


def test_weights_file_with_a_wrong_inner_shape_is_refused(tmp_path, resnet18_state):
    state = dict(resnet18_state)
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    path = _save(state, tmp_path / "bad.pth")
    with pytest.raises(HeadstartError, match="conv1.weight"):
        build_network("resnet18", weights=str(path))


def test_unreadable_weights_file_is_an_error(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(HeadstartError, match="cannot read"):
        build_network("resnet18", weights=str(path))


def test_weights_file_with_another_class_count_skips_the_final_layer(tmp_path):
    torch.manual_seed(3)
    state = torchvision.models.resnet18(weights=None, num_classes=10).state_dict()
    path = _save(state, tmp_path / "r18_10.safetensors")
    net = build_network("resnet18", weights=str(path))
    assert net.head.out_features == 1000  # file's 10-class layer skipped
    body = net.body.state_dict()
    for k, v in state.items():
        if not k.startswith("fc."):
            assert torch.equal(body[k], v), k
    net = build_network("resnet18", weights=str(path), num_classes=10)
    assert net.head.out_features == 10


@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
def test_weights_file_with_another_class_count_skips_aux_layers(tmp_path, name):
    torch.manual_seed(5)
    model = torchvision.models.get_model(name, weights=None, num_classes=10, aux_logits=True, init_weights=False)
    path = _save(model.state_dict(), tmp_path / f"{name}10.pth")
    net = build_network(name, weights=str(path), num_classes=10)
    conv = "conv1.conv.weight" if name == "googlenet" else "Conv2d_1a_3x3.conv.weight"
    saved, body = model.state_dict(), net.body.state_dict()
    assert torch.equal(body[conv], saved[conv])
    # The auxiliary classifiers are kept, each with a new 10-class last layer; only that layer (sized
    # for the model's 1,000 ImageNet classes when the file was read) was skipped: the rest of each
    # auxiliary classifier holds the file's weights.
    assert len(net.aux) == (2 if name == "googlenet" else 1)
    for last in net.aux:
        assert net.body.get_submodule(last).out_features == 10
        root = last.split(".")[0]
        kept = [k for k in saved if k.startswith(root + ".") and not k.startswith(last + ".")]
        assert kept and all(torch.equal(body[k], saved[k]) for k in kept), root


def test_weights_file_skips_the_family_final_layer_and_keeps_the_rest_of_the_head(tmp_path):
    """The final-layer rule follows the family's head path (``classifier.3``), not ``fc``, and
    the earlier classifier layers come from the file."""
    torch.manual_seed(4)
    state = torchvision.models.mobilenet_v3_small(weights=None, num_classes=4).state_dict()
    path = _save(state, tmp_path / "mnv3_4.pth")
    net = build_network("mobilenet_v3_small", weights=str(path), num_classes=4)
    assert torch.equal(net.head[0].weight, state["classifier.0.weight"])
    assert torch.equal(net.body.features[0][0].weight, state["features.0.0.weight"])
    assert net.head[3].out_features == 4


# ------------------------------------------------------------------ timm


def test_timm_model_builds_with_groups():
    torch.manual_seed(0)
    net = build_network("tf_efficientnet_lite0", weights="none", num_classes=5)
    assert net.source == "timm" and net.num_classes == 5
    assert len(net.groups) >= 4
    body_params = [n for n, _ in net.body.named_parameters()]
    for n in body_params:
        assert sum(g.owns(n) for g in net.groups) == 1, n
    assert all(any(g.owns(n) for n in body_params) for g in net.groups)
    freeze(net, "body")
    assert {n for n, p in net.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    x = torch.randn(2, 3, 64, 64)
    net.train()
    assert net(x).shape == (2, 5)
    net.eval()
    with torch.no_grad():
        assert net(x).shape == (2, 5)
    net.replace_head(3, HeadConfig(kind="mlp", hidden=[16]))
    with torch.no_grad():
        assert net(x).shape == (2, 3)
    _check_chain(net, x, "tf_efficientnet_lite0")


def test_timm_resnet_has_a_step_chain():
    torch.manual_seed(0)
    net = build_network("timm:resnet18", weights="none", num_classes=4)
    _check_chain(net, torch.randn(2, 3, 64, 64), "resnet18")


def test_deep_copied_network_runs_its_own_chain():
    net = build_network("resnet18", weights="none", num_classes=3, input_size=32).eval()
    twin = copy.deepcopy(net)
    with torch.no_grad():
        twin.body.layer1[0].conv1.weight.zero_()
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(twin.run_steps(x), twin.features(x))
        assert not torch.allclose(twin.run_steps(x), net.run_steps(x))


def test_timm_weights_file_with_another_class_count(tmp_path):
    import timm

    torch.manual_seed(6)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10)
    path = _save(model.state_dict(), tmp_path / "lite0_10.pth")
    net = build_network("tf_efficientnet_lite0", weights=str(path), num_classes=10)
    assert torch.equal(net.body.conv_stem.weight, model.conv_stem.weight)
