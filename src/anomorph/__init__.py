"""anomorph: unsupervised anomaly detection in medical images with uncertainty-guided
deformable auto-encoders.

The public Python API mirrors the CLI one-to-one::

    from anomorph import build_phantom, check_manifest, SliceDataset
"""
from __future__ import annotations

__version__ = "0.1.0"

from .config import ConfigError, RunConfig, load_config
from .data import DataError, SliceBatch, SliceConfig, SliceDataset, read_manifest
from .data.summary import check_manifest


def build_phantom(*args, **kwargs):
    """Build the built-in brain phantom; see :func:`anomorph.data.phantom.build_phantom`."""
    from .data.phantom import build_phantom as _build

    return _build(*args, **kwargs)


__all__ = [
    "__version__", "ConfigError", "RunConfig", "load_config", "DataError", "SliceBatch", "SliceConfig",
    "SliceDataset", "read_manifest", "check_manifest", "build_phantom",
]
