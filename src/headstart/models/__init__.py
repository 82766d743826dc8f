"""Pretrained backbones as headstart networks: sources, families, weights, heads, freezing, checkpoints.

A :class:`Network` is a backbone split into ``body`` (the feature extractor) and ``head`` (the
classifier), with the body's ordered depth groups; ``build_network`` makes one from a registered
source (torchvision or timm) and ``load_network`` rebuilds a trained one from its checkpoint.
"""

from headstart.models.backbones import build_network, list_backbones
from headstart.models.checkpoint import load_network, model_record
from headstart.models.checkpoint import read as read_checkpoint
from headstart.models.network import Network
from headstart.models.preprocess import Preprocessing

__all__ = ["Network", "Preprocessing", "build_network", "list_backbones", "load_network", "model_record",
           "read_checkpoint"]
