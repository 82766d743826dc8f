"""Images in, tensors out: decoding, datasets, data sources, transforms, splits and loaders.

The modules, lowest first (each imports only those above it):

* ``images``: decoding any image file to 8-bit RGB, and checking that a file decodes;
* ``transforms``: per-image transforms and their batched twin;
* ``datasets``: the :class:`~headstart.data.datasets.ImageDataset` interface and its kinds
  (arrays, files, decoded in memory); ``bundle``: :class:`DataBundle`;
* ``splits``: seeded stratified splits and limits;
* ``loaders``: :func:`make_loader` and the default number of workers;
* ``folders``: scanning image folders (each file once, unreadable files found);
* ``sources``: the registry of data sources (digits, CIFAR, image folders);
* ``memory``: the in-memory copy of image folders; ``build``: :func:`build_data`.
"""

from headstart.data.build import build_data
from headstart.data.bundle import DataBundle
from headstart.data.folders import folder_dataset, list_images
from headstart.data.images import load_image, to_rgb
from headstart.data.loaders import make_loader
from headstart.data.transforms import build_transform

__all__ = ["DataBundle", "build_data", "build_transform", "folder_dataset", "list_images", "load_image",
           "make_loader", "to_rgb"]
