"""Lightning data module over the in-memory slice datasets."""
from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from ..config import DataConfig
from ..data import SliceConfig, SliceDataset, collate_slices, read_manifest


def slice_config(data: DataConfig) -> SliceConfig:
    """The :class:`SliceConfig` described by a run's data section."""
    return SliceConfig.from_config(data)


class EpochSeededSampler(Sampler[int]):
    """Random order that depends only on (seed, epoch): Lightning calls :meth:`set_epoch` each
    epoch, so a run resumed at epoch k draws exactly the order an uninterrupted run draws."""

    def __init__(self, length: int, seed: int) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length


class SliceDataModule(L.LightningDataModule):
    """Train on healthy ``train`` slices; validate on healthy ``val`` slices (SPEC §2).

    Shuffling depends only on (``seed``, epoch) (:class:`EpochSeededSampler`), so the batch
    order is reproducible and survives a resume.
    """

    def __init__(self, data: DataConfig, seed: int = 0) -> None:
        super().__init__()
        self.data = data
        self.seed = seed
        self.train_set: SliceDataset | None = None
        self.val_set: SliceDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        rows = read_manifest(self.data.manifest, require_train=True)
        cfg = slice_config(self.data)
        self.train_set = SliceDataset(self.data.manifest, ["train"], cfg, healthy_only=True, rows=rows)
        has_val = any(r.split == "val" for r in rows)
        # without a val split, validate on the training slices (documented in docs/training.md)
        self.val_set = (SliceDataset(self.data.manifest, ["val"], cfg, healthy_only=True, rows=rows)
                        if has_val else self.train_set)

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        return DataLoader(self.train_set, batch_size=self.data.batch_size,
                          sampler=EpochSeededSampler(len(self.train_set), self.seed), drop_last=False,
                          collate_fn=collate_slices, num_workers=self.data.num_workers,
                          persistent_workers=self.data.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None
        return DataLoader(self.val_set, batch_size=self.data.batch_size, shuffle=False,
                          collate_fn=collate_slices, num_workers=self.data.num_workers,
                          persistent_workers=self.data.num_workers > 0)
