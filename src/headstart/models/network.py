"""One head API for every architecture.

:class:`Network` holds a backbone split in two: ``body`` maps an image batch to the tensor the
classifier reads, ``head`` maps that tensor to logits. Whatever the architecture calls its parts
(VGG's ``classifier``, ResNet's ``fc``, ViT's ``heads``), headstart code only sees
``net.features(x)``, ``net.forward_head(f)``, ``net.replace_head(...)`` and ``net.groups``, the
body's ordered depth groups (stem, stages, ...) used for freezing and learning rates.

Example::

    >>> from headstart.models.backbones import build_network
    >>> net = build_network("resnet18", weights="none", num_classes=7)
    >>> [g.name for g in net.groups]
    ['stem', 'layer1', 'layer2', 'layer3', 'layer4']
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from headstart.config import HeadConfig
from headstart.errors import HeadstartError
from headstart.models.preprocess import Preprocessing

BN_POLICIES = ("frozen", "train", "eval-all")  # see apply_train_mode
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "leaky_relu": nn.LeakyReLU}


@dataclass
class Group:
    """A depth group: named prefixes (modules or parameters) of the body, in input-to-output order."""

    name: str
    prefixes: list[str] = field(default_factory=list)

    def owns(self, param_name: str) -> bool:
        return any(param_name == p or param_name.startswith(p + ".") for p in self.prefixes)


@dataclass
class Step:
    """One link of the body's forward pass, which composed in order equals ``body(x)``.

    ``run(body, x)`` computes the step (it looks its modules up in ``body`` at call time, so a
    deep-copied network runs its own copy); ``prefixes`` name the body parameters it uses. Chains
    let a stage cache the output of a frozen prefix of the body and train only the rest
    (see :meth:`Network.frozen_prefix`).
    """

    name: str
    run: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    prefixes: list[str] = field(default_factory=list)


class Network(nn.Module):
    """A classifier made of a pretrained ``body`` and a replaceable ``head``.

    ``layout`` says what the body returns: ``flat`` (B, C), ``pooled`` (B, C, 1, 1) or ``map``
    (B, C, H, W); new heads pool and flatten as needed. ``final`` is the path of the original
    head's last layer inside ``head`` ("" when the head is that layer). ``aux`` lists auxiliary
    classifiers' last layers inside the body (Inception v3, GoogLeNet), replaced with the head.
    """

    def __init__(
        self,
        body: nn.Module,
        head: nn.Module,
        *,
        name: str,
        groups: list[Group],
        feature_dim: int,
        layout: str,
        final: str,
        aux: list[str],
        preprocessing: Preprocessing,
        source: str = "torchvision",
    ) -> None:
        super().__init__()
        self.body, self.head = body, head
        self.name, self.groups, self.feature_dim = name, groups, feature_dim
        self.layout, self.final, self.aux = layout, final, aux
        self.preprocessing, self.source = preprocessing, source
        self.head_config = HeadConfig()
        self.num_classes = _out_features(_final_layer(head, final))
        # The pretrained head is kept (outside the module tree, so not in state_dict) because
        # the seed's "replace only the final layer" head is built from it.
        self._pretrained_head = [copy.deepcopy(head)]
        # What BatchNorm and frozen groups do in train mode; see ``freeze.apply_train_mode``.
        self.bn_policy = "frozen"
        # Which weights were loaded, as a user would name them (set by the builder).
        self.weights_name = "none"
        # The body's forward as a chain of steps, where the family provides one (None: the body
        # only runs whole, and only a fully frozen body can be cached).
        self.chain: list[Step] | None = None

    # ------------------------------------------------------------------ forward

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The body's output: the tensor the head reads."""
        out = self.body(x)
        return out[0] if isinstance(out, tuple) else out

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits plus the auxiliary classifiers' logits when the body computed them."""
        out = self.body(x)
        if isinstance(out, tuple):  # InceptionOutputs / GoogLeNetOutputs in train mode
            main, *aux = out
            return self.head(main), [a for a in aux if a is not None]
        return self.head(out), []

    def set_aux(self, enabled: bool) -> None:
        """Compute auxiliary logits in train mode only when they can train something."""
        if self.aux and hasattr(self.body, "aux_logits"):
            self.body.aux_logits = enabled

    def train(self, mode: bool = True) -> "Network":
        super().train(mode)
        if mode:
            apply_train_mode(self)
        return self

    def run_steps(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Steps ``start`` to ``stop`` of the chain (all of them: the same as :meth:`features`)."""
        if self.chain is None:
            raise HeadstartError(f"{self.name} has no step chain: its body only runs whole")
        for step in self.chain[start:stop]:
            x = step.run(self.body, x)
        return x

    def frozen_prefix(self) -> int:
        """How many leading chain steps are fixed functions now: their output can be cached.

        The prefix ends after the last step, from the start, whose parameters are all frozen;
        parameter-free steps (ReLU, pooling) between frozen ones belong to it, those after the
        last one do not (they may be dropout). 0 when there is no chain, when nothing at the
        start is frozen, or when frozen BatchNorm still uses batch statistics (policy ``train``).
        """
        if self.chain is None or self.bn_policy == "train":
            return 0
        params = dict(self.body.named_parameters())
        # Only whole frozen groups are put in eval mode while training (``freeze.apply_train_mode``):
        # a frozen step inside a partly trainable group could still run dropout in train mode.
        live = {self.group_of(n) for n, p in params.items() if p.requires_grad}
        cut = 0
        for i, step in enumerate(self.chain):
            own = [n for n in params if _owned(n, step.prefixes)]
            if any(params[n].requires_grad or self.group_of(n) in live for n in own):
                break
            if own:
                cut = i + 1
        return cut

    def prefix_fingerprint(self, cut: int) -> str:
        """sha256 over the weights of the first ``cut`` steps (names, shapes, bytes) and the cut."""
        assert self.chain is not None
        h = hashlib.sha256(f"{self.name}|{cut}|{[s.name for s in self.chain[:cut]]}".encode())
        prefixes = [p for s in self.chain[:cut] for p in s.prefixes]
        for name, t in self.body.state_dict().items():
            if _owned(name, prefixes):
                h.update(name.encode())
                h.update(str(tuple(t.shape)).encode())
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------------ groups

    def group_params(self) -> Iterator[tuple[str, list[tuple[str, nn.Parameter]]]]:
        """(group name, [(full parameter name, parameter)]) for each depth group, then ``head``."""
        buckets: dict[str, list[tuple[str, nn.Parameter]]] = {g.name: [] for g in self.groups}
        for n, p in self.body.named_parameters():
            buckets[self.group_of(n)].append(("body." + n, p))
        for g in self.groups:
            yield g.name, buckets[g.name]
        yield "head", [("head." + n, p) for n, p in self.head.named_parameters()]

    def group_of(self, body_param: str) -> str:
        for g in self.groups:
            if g.owns(body_param):
                return g.name
        # Parameters no group names (unusual variants) train with the last group.
        return self.groups[-1].name

    def group_modules(self, group: Group) -> list[nn.Module]:
        """The body's submodules named by a group (parameters named directly are skipped)."""
        mods = []
        for p in group.prefixes:
            try:
                mods.append(self.body.get_submodule(p))
            except AttributeError:
                pass
        return mods

    # ------------------------------------------------------------------ head

    def replace_head(self, num_classes: int, cfg: HeadConfig | None = None) -> "Network":
        """Put a new classifier for ``num_classes`` on the body, as ``cfg`` describes.

        ``replace`` keeps the pretrained classifier and swaps only its last layer (VGG16's
        ``classifier[6]`` becomes ``Linear(4096, num_classes)``); ``linear`` is one new layer on
        the pooled features; ``mlp`` adds ``cfg.hidden`` layers with activation, optional batch
        norm and dropout. Auxiliary classifiers get a new last layer too.
        """
        cfg = cfg or HeadConfig()
        if num_classes < 2:
            raise HeadstartError(f"a classifier needs at least 2 classes, got {num_classes}")
        if cfg.kind == "replace":
            head = copy.deepcopy(self._pretrained_head[0])
            new = _new_final(_final_layer(head, self.final), num_classes)
            if self.final:
                _set_module(head, self.final, new)
            else:
                head = new
        elif cfg.kind in ("linear", "mlp"):
            head = build_mlp_head(self.feature_dim, num_classes, cfg, self.layout)
        else:
            raise HeadstartError(f"unknown head kind {cfg.kind!r}: use replace, linear or mlp")
        device = next(self.body.parameters()).device
        self.head = head.to(device)
        for path in self.aux:
            old = self.body.get_submodule(path)
            _set_module(self.body, path, _new_final(old, num_classes).to(device))
        self.head_config, self.num_classes = copy.deepcopy(cfg), num_classes
        return self


def apply_train_mode(net: Network) -> None:
    """Put frozen parts in eval mode according to ``net.bn_policy`` (called by ``net.train()``).

    ``frozen`` (default): frozen groups and BatchNorm layers without trainable parameters keep
    their running statistics; ``eval-all``: every BatchNorm layer does; ``train``: nothing is held."""
    policy = net.bn_policy
    if policy not in BN_POLICIES:
        raise HeadstartError(f"unknown BatchNorm policy {policy!r}; choose from {', '.join(BN_POLICIES)}")
    if policy == "train":
        return
    if not any(p.requires_grad for p in net.body.parameters()):
        net.body.eval()  # the whole body is a fixed function
    else:
        for g in net.groups:
            mods = net.group_modules(g)
            if mods and not any(p.requires_grad for m in mods for p in m.parameters()):
                for m in mods:
                    m.eval()
    for m in net.modules():
        if isinstance(m, _BatchNorm) and (policy == "eval-all" or not any(p.requires_grad for p in m.parameters())):
            m.eval()


def build_mlp_head(in_features: int, num_classes: int, cfg: HeadConfig, layout: str) -> nn.Sequential:
    """A new classifier: pool/flatten as the body's layout needs, hidden layers, final Linear."""
    if cfg.kind == "linear" and cfg.hidden:
        raise HeadstartError("a linear head has no hidden layers: use --head mlp with --hidden")
    if cfg.activation not in ACTIVATIONS:
        raise HeadstartError(f"unknown activation {cfg.activation!r}; choose from {', '.join(ACTIVATIONS)}")
    layers: list[nn.Module] = []
    if layout == "map":
        layers.append(nn.AdaptiveAvgPool2d(1))
    if layout in ("map", "pooled"):
        layers.append(nn.Flatten(1))
    width = in_features
    for h in cfg.hidden if cfg.kind == "mlp" else []:
        layers.append(nn.Linear(width, h, bias=not cfg.batchnorm))
        if cfg.batchnorm:
            layers.append(nn.BatchNorm1d(h))
        layers.append(ACTIVATIONS[cfg.activation]())
        if cfg.dropout:
            layers.append(nn.Dropout(cfg.dropout))
        width = h
    if cfg.dropout and not (cfg.kind == "mlp" and cfg.hidden):
        layers.append(nn.Dropout(cfg.dropout))
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------- module surgery


def _owned(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _final_layer(head: nn.Module, path: str) -> nn.Module:
    return head.get_submodule(path) if path else head


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _out_features(layer: nn.Module) -> int:
    for attr in ("out_features", "out_channels"):
        if hasattr(layer, attr):
            return int(getattr(layer, attr))
    last = [m for m in layer.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return _out_features(last[-1]) if last else 0


def _new_final(old: nn.Module, num_classes: int) -> nn.Module:
    """A fresh last layer of the same kind and width as ``old``, for ``num_classes``."""
    if isinstance(old, nn.Linear):
        return nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    if isinstance(old, nn.Conv2d):  # SqueezeNet classifies with a 1x1 convolution
        return nn.Conv2d(old.in_channels, num_classes, kernel_size=old.kernel_size)
    raise HeadstartError(f"internal: cannot replace a final layer of type {type(old).__name__}")
