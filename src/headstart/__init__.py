"""headstart: transfer learning of image classifiers on PyTorch."""

__version__ = "0.1.0"
