"""``anomorph fit-head``: train the learned non-correspondence head of a deformable run.

The trained MorphAEus stays frozen (eval mode, no gradients). Every healthy *training* slice
gets ``draws`` independent sets of synthetic anomalies
(:func:`anomorph.guidance.masks.synthetic_corruption`: pasted intensities, rescaled tissue,
foreign patches — not the phantom's lesion generator); the frozen network reconstructs x̂ and
registers it (x̃) to each corrupted slice once, exactly as at inference, so the head sees
lesions that the field has partly registered away. (The frozen pass costs about twice a head
step, so this pool is computed once instead of at every step.) The head
(:class:`~anomorph.networks.NonCorrespondenceNet`) is trained to segment the corruption with
binary cross-entropy + soft Dice inside the brain mask. No val or test slice is read.

Output, next to the run's checkpoints::

    RUN_DIR/noncorrespondence/head.pt     state dict (tensors only: torch.load(weights_only=True))
    RUN_DIR/noncorrespondence/head.json   network options, training settings, the run
                                          checkpoint's SHA-256, final losses, wall time
    RUN_DIR/noncorrespondence/logs/       Lightning CSV log (loss per step)

Use it as the u estimator ``noncorrespondence`` (``--estimator noncorrespondence``).
"""
from __future__ import annotations

import dataclasses
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from ..config import ConfigError
from ..data.io import atomic_write
from ..data.slices import SliceDataset
from ..guidance.masks import synthetic_corruption
from ..networks import NonCorrespondenceNet
from ..runs import HEAD_INFO, HEAD_WEIGHTS, checkpoint_path, file_sha256, has_head, head_dir, load_run
from ..runtime import configure_threads
from ..uncertainty.base import is_deformable
from .datamodule import slice_config


@dataclass
class HeadSettings:
    """How the head is trained. ``draws`` corrupted copies of every healthy training slice form
    the pool; ``steps`` Adam steps of ``batch_size`` pool samples (randomly mirrored along each
    axis) at learning rate ``lr``; ``channels`` the U-Net widths; corruption: up to ``max_blobs``
    blobs of radius ``radius_range`` (fraction of the image side), a share
    ``empty_probability`` of slices left clean, changes below ``min_change`` (intensity) not
    counted as anomaly; ``dice_weight`` weights the soft Dice term against the BCE; ``seed``
    seeds the head's initialisation, the batch order and the corruptions."""

    steps: int = 600
    batch_size: int = 32
    draws: int = 4
    lr: float = 1e-3
    channels: tuple[int, ...] = (16, 32, 64, 128)
    max_blobs: int = 3
    radius_range: tuple[float, float] = (0.03, 0.15)
    empty_probability: float = 0.25
    min_change: float = 0.05
    dice_weight: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 2 or self.draws < 1:
            raise ConfigError(f"fit-head: steps must be ≥ 1 and batch_size ≥ 2, got {self.steps}, {self.batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"fit-head: lr must be positive, got {self.lr}")
        if len(self.radius_range) != 2 or len(self.channels) < 2:
            raise ConfigError(f"fit-head: radius_range needs 2 values and channels at least 2, got "
                              f"{self.radius_range}, {self.channels}")
        if not 0 < self.radius_range[0] <= self.radius_range[1] < 0.5:
            raise ConfigError(f"fit-head: radius_range must satisfy 0 < low ≤ high < 0.5, got {self.radius_range}")
        if not 0 <= self.empty_probability < 1:
            raise ConfigError(f"fit-head: empty_probability must be in [0, 1), got {self.empty_probability}")


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 − soft Dice of sigmoid(logits) against ``target`` over the pixels with ``weight`` > 0,
    pooled over the batch (so clean slices do not each contribute an undefined Dice)."""
    p = torch.sigmoid(logits) * weight
    t = target * weight
    return 1 - (2 * (p * t).sum() + eps) / (p.sum() + t.sum() + eps)


def corrupted_pool(network: torch.nn.Module, images: torch.Tensor, brains: torch.Tensor, settings: "HeadSettings",
                   batch_size: int = 32) -> TensorDataset:
    """``draws`` corrupted copies of every slice with the frozen network's x̂ and x̃:
    a dataset of (corrupted x, x̂, x̃, target, brain mask), each ``(N·draws, ·, *spatial)``."""
    generator = torch.Generator().manual_seed(settings.seed + 1)
    parts: list[list[torch.Tensor]] = [[], [], [], [], []]
    network.eval()
    with torch.no_grad():
        for _ in range(settings.draws):
            for start in range(0, images.shape[0], batch_size):
                x, brain = images[start:start + batch_size], brains[start:start + batch_size]
                corrupted, target = synthetic_corruption(x, generator, brain, settings.max_blobs, settings.radius_range,
                                                         settings.empty_probability, settings.min_change)
                out = network(corrupted)
                for part, value in zip(parts, (corrupted, out.reconstruction, out.warped, target, brain)):
                    part.append(value)
    return TensorDataset(*(torch.cat(part) for part in parts))


class HeadModule(L.LightningModule):
    """Lightning wrapper of the head; batches are (corrupted x, x̂, x̃, target, brain mask) from
    :func:`corrupted_pool`, mirrored at random along each spatial axis."""

    def __init__(self, head: NonCorrespondenceNet, settings: HeadSettings) -> None:
        super().__init__()
        self.head = head
        self.settings = settings
        self.generator = torch.Generator().manual_seed(settings.seed + 2)
        self.recent: list[float] = []

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_index: int) -> torch.Tensor:
        s = self.settings
        flips = torch.rand(batch[0].ndim - 2, generator=self.generator) < 0.5
        axes = [2 + axis for axis, flip in enumerate(flips.tolist()) if flip]
        corrupted, prior, warped, target, brains = (t.flip(axes) if axes else t for t in batch)
        logits = self.head(corrupted, prior, warped)
        weight = (brains > 0).float()
        bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight).sum() / weight.sum().clamp_min(1)
        dice = soft_dice_loss(logits, target, weight)
        loss = bce + s.dice_weight * dice
        self.log_dict({"head/bce": bce, "head/dice_loss": dice, "head/loss": loss}, on_step=True, on_epoch=False)
        self.recent = (self.recent + [float(loss.detach())])[-50:]
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.head.parameters(), lr=self.settings.lr)


def fit_head(run_dir: str | Path, settings: HeadSettings | None = None, manifest: str | Path | None = None,
             overwrite: bool = False) -> Path:
    """Train the non-correspondence head of the deformable run ``run_dir``; returns
    ``RUN_DIR/noncorrespondence/``. ``manifest``: where the healthy training slices come from
    (default: the run's own ``data.manifest``). An existing head is kept unless ``overwrite``."""
    settings = settings or HeadSettings()
    run_dir = Path(run_dir)
    out = head_dir(run_dir)
    if has_head(run_dir) and not overwrite:
        return out
    network, config = load_run(run_dir)
    if not is_deformable(network):
        raise ConfigError(f"{run_dir}: the non-correspondence head needs a deformable (morphaeus) run, "
                          f"got model {config.model.name!r}")
    configure_threads()
    train = SliceDataset(manifest or config.data.manifest, ["train"], slice_config(config.data), healthy_only=True)
    if len(train) < settings.batch_size:
        raise ConfigError(f"{train.manifest}: {len(train)} healthy training slices, fewer than the batch size "
                          f"{settings.batch_size}")
    torch.manual_seed(settings.seed)
    head = NonCorrespondenceNet(spatial_dims=network.spatial_dims,
                                image_channels=train.images.shape[1], channels=settings.channels)
    started = time.time()
    pool = corrupted_pool(network, train.images, train.brain_masks.float(), settings)
    module = HeadModule(head, settings)
    loader = DataLoader(pool, batch_size=settings.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(settings.seed))
    out.mkdir(parents=True, exist_ok=True)
    trainer = L.Trainer(max_steps=settings.steps, max_epochs=-1, accelerator="cpu", devices=1,
                        logger=CSVLogger(out, name="logs"), enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=25)
    trainer.fit(module, loader)
    seconds = time.time() - started
    head.eval()
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in head.state_dict().items()}, buffer)
    atomic_write(out / HEAD_WEIGHTS, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))
    info: dict[str, Any] = {
        "network": head.options(),
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()},
        "run_checkpoint_sha256": file_sha256(checkpoint_path(run_dir)),
        "train_manifest": str(train.manifest), "train_slices": len(train), "pool_samples": len(pool),
        "pool_anomaly_fraction": float(pool.tensors[3].sum() / pool.tensors[4].gt(0).sum().clamp_min(1)),
        "final_loss_mean_last_50_steps": sum(module.recent) / max(len(module.recent), 1),
        "wall_seconds": round(seconds, 1),
    }
    atomic_write(out / HEAD_INFO, lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2)))
    return out
