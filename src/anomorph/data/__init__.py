"""Data layer: manifests, image I/O, slice datasets and the built-in phantom."""
from .manifest import DataError, ManifestRow, read_manifest, write_manifest
from .slices import SliceConfig, SliceDataset, load_subject, to_model_grid, to_source_grid
from .types import SliceBatch, SliceGeometry, SliceSample, collate_slices

__all__ = [
    "DataError", "ManifestRow", "read_manifest", "write_manifest", "SliceConfig", "SliceDataset",
    "load_subject", "to_model_grid", "to_source_grid", "SliceBatch", "SliceGeometry", "SliceSample",
    "collate_slices",
]
