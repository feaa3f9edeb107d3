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
    images of a ``(B, 1, H, W)`` batch. Intensities share the [0, 1] scale."""
    n = min(max_rows, images.shape[0])
    columns = [("input x", images), ("pseudo-healthy x̂", output.reconstruction),
               ("warped x̃", output.warped), ("|x − x̃|", (images - output.warped).abs())]
    fig, axes = plt.subplots(n, len(columns), figsize=(2.2 * len(columns), 2.2 * n), squeeze=False)
    for r in range(n):
        for c, (name, tensor) in enumerate(columns):
            ax = axes[r][c]
            ax.imshow(tensor[r, 0].detach().float().cpu().numpy().T, cmap="gray" if c < 3 else "inferno",
                      vmin=0, vmax=1 if c < 3 else 0.5, origin="lower")
            ax.set_axis_off()
            if r == 0:
                ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
