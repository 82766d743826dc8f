"""Where each architecture family keeps its classifier, and how its body splits into depth groups.

A :class:`Family` is matched by the model's class name. It names the head attribute, the head's
last layer, what the body returns once the head is cut off, auxiliary classifiers, and a function
listing the body's depth groups from input to output. Adding a family is adding one entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from headstart.models.network import Group, Step


@dataclass(frozen=True)
class Family:
    head: str  # attribute of the model holding the classifier
    final: str  # path of the classifier's last layer inside the head ("" = the head itself)
    layout: str  # what the body returns: flat, pooled or map
    groups: Callable[[nn.Module], list[Group]]
    aux: tuple[str, ...] = field(default_factory=tuple)
    # Cut the model into (body, head) differently from "replace the head with Identity".
    split: Callable[[nn.Module], tuple[nn.Module, nn.Module]] | None = None
    # The body's forward pass as a chain of steps (None: it only runs whole, as for the
    # Inception family, whose auxiliary classifiers branch off mid-body).
    chain: Callable[[nn.Module], list[Step]] | None = None


# ---------------------------------------------------------------------- group builders


def _named(*groups: tuple[str, list[str]]) -> list[Group]:
    return [Group(n, list(p)) for n, p in groups]


def _split_at_pools(seq_path: str) -> Callable[[nn.Module], list[Group]]:
    """VGG, AlexNet, SqueezeNet: a new group after each max-pooling layer."""

    def groups(model: nn.Module) -> list[Group]:
        seq = model.get_submodule(seq_path)
        blocks: list[list[str]] = [[]]
        for i, m in enumerate(seq):
            blocks[-1].append(f"{seq_path}.{i}")
            if isinstance(m, nn.MaxPool2d):
                blocks.append([])
        return _merge_paramless(model, [Group(f"block{i + 1}", b) for i, b in enumerate(blocks) if b])

    return groups


def _split_by_resolution(seq_path: str, stem: int = 1) -> Callable[[nn.Module], list[Group]]:
    """MobileNet, EfficientNet, MnasNet: a new group wherever the feature map shrinks.

    The split is read off a tiny forward pass, so every width and depth variant gets stages
    that match its real strides without a table of indices per variant.
    """

    def groups(model: nn.Module) -> list[Group]:
        seq = model.get_submodule(seq_path)
        sizes = _child_resolutions(model, seq)
        names = [f"{seq_path}.{i}" for i in range(len(seq))]
        out = [Group("stem", names[:stem])]
        for i in range(stem, len(seq)):
            if sizes[i] < sizes[i - 1] or len(out) == 1:
                out.append(Group(f"stage{len(out)}", []))
            out[-1].prefixes.append(names[i])
        return _merge_paramless(model, out)

    return groups


def _child_resolutions(model: nn.Module, seq: nn.Sequential) -> list[int]:
    sizes: list[int] = []
    hooks = [c.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1])) for c in seq]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, 64, 64))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return sizes


def _merge_paramless(model: nn.Module, groups: list[Group]) -> list[Group]:
    """Fold groups without parameters (a trailing pooling layer) into their neighbour, renumber."""
    out: list[Group] = []
    for g in groups:
        if out and not any(_has_params(model, p) for p in g.prefixes):
            out[-1].prefixes += g.prefixes
        else:
            out.append(g)
    base = out[-1].name.rstrip("0123456789")
    for i, g in enumerate(out[1:] if out[0].name == "stem" else out, start=1):
        g.name = f"{base}{i}"
    return out


def _has_params(model: nn.Module, prefix: str) -> bool:
    return any(n == prefix or n.startswith(prefix + ".") for n, _ in model.named_parameters())


def _pairs(extra_last: list[str] | None = None) -> Callable[[nn.Module], list[Group]]:
    """ConvNeXt, Swin: ``features`` alternates downsampling and stage; pair them."""

    def groups(model: nn.Module) -> list[Group]:
        n = len(model.features)
        out = [Group("stem" if i == 0 else f"stage{i // 2}", [f"features.{i}", f"features.{i + 1}"])
               for i in range(0, n, 2)]
        out[-1].prefixes += extra_last or []
        return out

    return groups


def _resnet(model: nn.Module) -> list[Group]:
    return _named(("stem", ["conv1", "bn1"]), *[(f"layer{i}", [f"layer{i}"]) for i in range(1, 5)])


def _densenet(model: nn.Module) -> list[Group]:
    f = "features."
    return _named(
        ("stem", [f + "conv0", f + "norm0"]),
        ("block1", [f + "denseblock1", f + "transition1"]),
        ("block2", [f + "denseblock2", f + "transition2"]),
        ("block3", [f + "denseblock3", f + "transition3"]),
        ("block4", [f + "denseblock4", f + "norm5"]),
    )


def _inception3(model: nn.Module) -> list[Group]:
    stem = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
    return _named(
        ("stem", stem),
        ("mixed5", ["Mixed_5b", "Mixed_5c", "Mixed_5d"]),
        ("mixed6", ["Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "AuxLogits"]),
        ("mixed7", ["Mixed_7a", "Mixed_7b", "Mixed_7c"]),
    )


def _googlenet(model: nn.Module) -> list[Group]:
    return _named(
        ("stem", ["conv1", "conv2", "conv3"]),
        ("inception3", ["inception3a", "inception3b"]),
        ("inception4", [f"inception4{c}" for c in "abcde"] + ["aux1", "aux2"]),
        ("inception5", ["inception5a", "inception5b"]),
    )


def _shufflenet(model: nn.Module) -> list[Group]:
    return _named(("stem", ["conv1"]), ("stage2", ["stage2"]), ("stage3", ["stage3"]), ("stage4", ["stage4", "conv5"]))


def _regnet(model: nn.Module) -> list[Group]:
    return _named(("stem", ["stem"]), *[(f"block{i}", [f"trunk_output.block{i}"]) for i in range(1, 5)])


def _maxvit(model: nn.Module) -> list[Group]:
    return _named(("stem", ["stem"]), *[(f"block{i + 1}", [f"blocks.{i}"]) for i in range(len(model.blocks))])


def _vit(model: nn.Module, chunks: int = 4) -> list[Group]:
    """ViT: patch embedding and position embedding, then the encoder in four equal chunks."""
    layers = [f"encoder.layers.{n}" for n, _ in model.encoder.layers.named_children()]
    size = -(-len(layers) // chunks)
    out = _named(("stem", ["conv_proj", "class_token", "encoder.pos_embedding"]))
    out += [Group(f"blocks{i + 1}", layers[i * size : (i + 1) * size]) for i in range(chunks)]
    out[-1].prefixes.append("encoder.ln")
    return out


def _squeezenet_split(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    # SqueezeNet classifies with a 1x1 convolution before pooling, so the body is the
    # convolutional trunk (a feature map) and the head ends by flattening the pooled logits.
    head = nn.Sequential(*model.classifier, nn.Flatten(1))
    return _SqueezeBody(model.features), head


class _SqueezeBody(nn.Module):
    def __init__(self, features: nn.Module) -> None:
        super().__init__()
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


# ---------------------------------------------------------------------- step chains
# A chain repeats the family's own forward (torchvision's ``forward`` with the head an Identity)
# step by step; tests check, for every model, that the chain's output equals the body's.


def _module(path: str) -> Step:
    return Step(path, lambda body, x, p=path: body.get_submodule(p)(x), [path])


def chain_of(*items: str | Step) -> Callable[[nn.Module], list[Step]]:
    """Steps from module paths (``"path/*"``: each child of a Sequential) and ready-made steps."""

    def chain(model: nn.Module) -> list[Step]:
        out: list[Step] = []
        for item in items:
            if isinstance(item, Step):
                out.append(item)
            elif item.endswith("/*"):
                path = item[:-2]
                out += [_module(f"{path}.{n}") for n, _ in model.get_submodule(path).named_children()]
            else:
                out.append(_module(item))
        return out

    return chain


FLATTEN = Step("flatten", lambda body, x: torch.flatten(x, 1))
AVG_POOL = Step("avgpool", lambda body, x: F.adaptive_avg_pool2d(x, (1, 1)))
MEAN_HW = Step("mean", lambda body, x: x.mean([2, 3]))


def _vit_stem(body: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # VisionTransformer.forward up to the encoder layers: patches, class token, positions.
    x = body._process_input(x)
    x = torch.cat([body.class_token.expand(x.shape[0], -1, -1), x], dim=1)
    return body.encoder.dropout(x + body.encoder.pos_embedding)


_vit_chain = chain_of(
    Step("stem", _vit_stem, ["conv_proj", "class_token", "encoder.pos_embedding"]),
    "encoder.layers/*", "encoder.ln", Step("class_token", lambda body, x: x[:, 0]),
)


def timm_chain(model: nn.Module) -> list[Step] | None:
    """The step chain of the timm classes headstart knows (EfficientNet, ResNet), else None."""
    drop = Step("drop", lambda body, x: F.dropout(x, p=float(body.drop_rate), training=body.training))
    name = type(model).__name__
    if name == "EfficientNet":
        return chain_of("conv_stem", "bn1", "blocks/*", "conv_head", "bn2", "global_pool", drop)(model)
    if name == "ResNet":
        return chain_of("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4",
                        "global_pool", drop)(model)
    return None


FAMILIES: dict[str, Family] = {
    "AlexNet": Family("classifier", "6", "flat", _split_at_pools("features"),
                      chain=chain_of("features/*", "avgpool", FLATTEN)),
    "VGG": Family("classifier", "6", "flat", _split_at_pools("features"),
                  chain=chain_of("features/*", "avgpool", FLATTEN)),
    "ResNet": Family("fc", "", "flat", _resnet, chain=chain_of(
        "conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", FLATTEN)),
    "DenseNet": Family("classifier", "", "flat", _densenet, chain=chain_of(
        "features/*", Step("relu", lambda body, x: F.relu(x)), AVG_POOL, FLATTEN)),
    "SqueezeNet": Family("classifier", "1", "map", _split_at_pools("features"), split=_squeezenet_split,
                         chain=chain_of("features/*")),
    "Inception3": Family("fc", "", "flat", _inception3, aux=("AuxLogits.fc",)),
    "GoogLeNet": Family("fc", "", "flat", _googlenet, aux=("aux1.fc2", "aux2.fc2")),
    "MobileNetV2": Family("classifier", "1", "flat", _split_by_resolution("features"),
                          chain=chain_of("features/*", AVG_POOL, FLATTEN)),
    "MobileNetV3": Family("classifier", "3", "flat", _split_by_resolution("features"),
                          chain=chain_of("features/*", "avgpool", FLATTEN)),
    "MNASNet": Family("classifier", "1", "flat", _split_by_resolution("layers", stem=8),
                      chain=chain_of("layers/*", MEAN_HW)),
    "ShuffleNetV2": Family("fc", "", "flat", _shufflenet, chain=chain_of(
        "conv1", "maxpool", "stage2", "stage3", "stage4", "conv5", MEAN_HW)),
    "EfficientNet": Family("classifier", "1", "flat", _split_by_resolution("features"),
                           chain=chain_of("features/*", "avgpool", FLATTEN)),
    "RegNet": Family("fc", "", "flat", _regnet, chain=chain_of("stem", "trunk_output/*", "avgpool", FLATTEN)),
    "ConvNeXt": Family("classifier", "2", "pooled", _pairs(), chain=chain_of("features/*", "avgpool")),
    "VisionTransformer": Family("heads", "head", "flat", _vit, chain=_vit_chain),
    "SwinTransformer": Family("head", "", "flat", _pairs(["norm"]),
                               chain=chain_of("features/*", "norm", "permute", "avgpool", "flatten")),
    "MaxVit": Family("classifier", "5", "map", _maxvit, chain=chain_of("stem", "blocks/*")),
}


def family_of(model: nn.Module) -> Family | None:
    return FAMILIES.get(type(model).__name__)


def split_model(model: nn.Module, fam: Family) -> tuple[nn.Module, nn.Module]:
    """Cut a torchvision model into (body, head); the body keeps the model's own forward."""
    if fam.split is not None:
        return fam.split(model)
    head = getattr(model, fam.head)
    setattr(model, fam.head, nn.Identity())
    return model, head


def feature_dim(head: nn.Module) -> int:
    """Width of the tensor the head reads: its first layer's input size."""
    for m in head.modules():
        for attr in ("in_features", "in_channels"):
            if hasattr(m, attr):
                return int(getattr(m, attr))
        if isinstance(m, (nn.LayerNorm,)) or type(m).__name__ == "LayerNorm2d":
            return int(m.normalized_shape[0])
    raise ValueError(f"cannot tell the input width of head {head}")
