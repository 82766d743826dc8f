"""Local weights files, one model of every torchvision family: saved by plain torchvision, loaded by
headstart, and headstart's wrapped model gives the plain model's logits."""

from __future__ import annotations

import pytest
import torch
import torchvision

import headstart as hs

# One small member of each family (the whole zoo is built in test_families.py).
FAMILIES = ["alexnet", "vgg11", "resnet18", "resnext50_32x4d", "wide_resnet50_2", "densenet121", "squeezenet1_1",
            "inception_v3", "googlenet", "mobilenet_v2", "mobilenet_v3_small", "mnasnet0_5", "mnasnet1_0",
            "shufflenet_v2_x0_5", "efficientnet_b0", "efficientnet_v2_s", "regnet_y_400mf", "convnext_tiny",
            "vit_b_16", "swin_t", "maxvit_t"]
SIZE = {"inception_v3": 299}  # the others take 224 px without complaint; the logits test runs at 64 px where it can
NATIVE = {"vit_b_16", "maxvit_t", "inception_v3", "swin_t"}


def _plain(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {"aux_logits": True, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    return torchvision.models.get_model(name, weights=None, **kwargs).eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_a_state_dict_file_saved_by_torchvision_loads_and_gives_the_same_logits(name, tmp_path):
    plain = _plain(name)
    path = tmp_path / f"{name}.pth"
    torch.save(plain.state_dict(), path)  # keeps _metadata, which MNASNet's loader reads
    net = hs.build_network(name, str(path)).eval()
    size = SIZE.get(name, 224 if name in NATIVE else 64)
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        want, got = plain(x), net(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
def test_a_state_dict_without_the_auxiliary_classifiers_is_accepted(name, tmp_path):
    plain = _plain(name)
    state = {k: v for k, v in plain.state_dict().items() if not k.startswith(("aux1.", "aux2.", "AuxLogits."))}
    path = tmp_path / f"{name}-noaux.pth"
    torch.save(state, path)
    net = hs.build_network(name, str(path)).eval()
    x = torch.rand(1, 3, SIZE.get(name, 64), SIZE.get(name, 64))
    with torch.no_grad():
        torch.testing.assert_close(net(x), plain(x), rtol=1e-4, atol=1e-4)
