"""Images in, tensors out: decoding, datasets, data sources, transforms, splits and loaders."""

from headstart.data.core import (
    DataBundle,
    build_data,
    build_transform,
    folder_dataset,
    list_images,
    load_image,
    make_loader,
    to_rgb,
)

__all__ = ["DataBundle", "build_data", "build_transform", "folder_dataset", "list_images", "load_image",
           "make_loader", "to_rgb"]
