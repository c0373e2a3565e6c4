"""consortia: federated learning for consortia of institutions."""

from consortia.version import __version__

__all__ = ["__version__"]
