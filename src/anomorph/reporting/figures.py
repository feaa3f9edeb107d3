"""Figures written during training and evaluation (matplotlib, Agg backend, no display)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ..data.io import atomic_write  # noqa: E402


def save_figure(fig, path: Path, dpi: int = 100) -> Path:
    """Save ``fig`` atomically as PNG and close it."""
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png"))
    plt.close(fig)
    return path


def save_reconstruction_grid(images: torch.Tensor, output, path: Path, max_rows: int = 4, title: str = "") -> Path:
    """Rows of input x, pseudo-healthy x̂, warped x̃ and |x − x̃| for the first ``max_rows``
    images of a ``(B, 1, H, W)`` batch. Intensities share the [0, 1] scale.

    Written once per validation epoch, so it is drawn cheaply: the tiles are colour-mapped with
    numpy into one RGB mosaic shown by a single ``imshow`` (16 axes with a tight bounding box
    took about a second per epoch on 2 busy CPU cores; benchmarks/README.md)."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    n = min(max_rows, images.shape[0])
    columns = [("input x", images, "gray", 1.0), ("pseudo-healthy x̂", output.reconstruction, "gray", 1.0),
               ("warped x̃", output.warped, "gray", 1.0),
               ("|x − x̃|", (images - output.warped).abs(), "inferno", 0.5)]
    gap = 2
    rows = []
    for r in range(n):
        tiles = []
        for _, tensor, cmap, vmax in columns:
            tile = tensor[r, 0].detach().float().cpu().numpy().T[::-1]  # as imshow(.T, origin="lower")
            rgb = colormaps[cmap](np.clip(tile / vmax, 0.0, 1.0))[..., :3]
            tiles += [rgb, np.ones((rgb.shape[0], gap, 3))]
        rows += [np.concatenate(tiles[:-1], axis=1)]
        rows += [np.ones((gap, rows[-1].shape[1], 3))]
    mosaic = np.concatenate(rows[:-1], axis=0)
    fig = Figure(figsize=(2.2 * len(columns), 2.2 * n + (0.65 if title else 0.3)))
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0 - (0.65 if title else 0.3) / (2.2 * n + (0.65 if title else 0.3))))
    ax.imshow(mosaic, interpolation="nearest", aspect="auto")
    ax.set_axis_off()
    width = mosaic.shape[1] / len(columns)
    for c, (name, *_rest) in enumerate(columns):
        ax.text((c + 0.5) * width, -2, name, ha="center", va="bottom", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    return path
