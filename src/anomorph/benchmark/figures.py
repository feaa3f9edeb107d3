"""Figures of a benchmark that explain the guided rows: per example test slice, every deformable
row's u, guidance mask m, anomaly map |x − x̃| and log det Jφ beside the lesion.

Written to ``<output_dir>/<dataset>/figures/guidance_<lesion type>.png`` (and ``..._healthy``)
for the first report seed, with the val-chosen values; regenerated on every benchmark call.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..reporting.figures import plt, save_figure


def _lesion_preservation(x, warped, recon, lesion) -> float | None:
    inside = lesion > 0
    before = np.abs(x - recon)[inside].sum()
    return None if before <= 0 else float(np.abs(x - warped)[inside].sum() / before)


def guidance_figures(config, dataset, seed: int, chosen: dict[str, Any]) -> list[Path]:
    """Render the panels for ``seed``'s example slices; returns the PNG paths."""
    from .runner import build_scorers, ensure_dataset, load_seed_data, seed_runs

    manifest = ensure_dataset(dataset, seed)
    runs = {name: path for name, (path, _) in seed_runs(config, dataset, seed, chosen).items()}
    data = load_seed_data(config, manifest, runs)
    scorers = [s for s in build_scorers(config, manifest, seed, runs, data, chosen) if getattr(s, "deformable", False)]
    test = data.test
    picked: dict[str, int] = {}
    for index in data.example_indices:  # per lesion type, then one slice without lesion
        has_lesion = bool(test.masks[index].any())
        picked.setdefault((test.meta[index][0].lesion_type or "lesion") if has_lesion else "healthy", index)
    out_dir = Path(config.output_dir) / dataset.name / "figures"
    paths = []
    for lesion_type, index in picked.items():
        x = test.images[index:index + 1]
        brain = test.brain_masks[index:index + 1]
        lesion = test.masks[index:index + 1]
        columns = ("input x, lesion outline", "u (healthy-normalised)", "guidance mask m", "anomaly |x − x̃|",
                   "log det Jφ")
        fig, axes = plt.subplots(len(scorers), len(columns), figsize=(2.1 * len(columns), 2.1 * len(scorers)),
                                 squeeze=False)
        image = x[0, 0].numpy().T
        outline = lesion[0, 0].numpy().T
        for r, scorer in enumerate(scorers):
            kwargs = {"lesion_masks": lesion} if getattr(scorer, "oracle", False) else {}
            with torch.no_grad():
                pred = scorer(x, brain, **kwargs)
            lpr = _lesion_preservation(x.numpy(), pred.warped.numpy(), pred.reconstruction.numpy(), lesion.numpy())
            panels = [
                (image, "gray", 0, 1),
                (None if pred.uncertainty is None else pred.uncertainty[0, 0].numpy().T, "magma", 0, 1),
                (None if pred.guidance_mask is None else pred.guidance_mask[0, 0].numpy().T, "viridis", 0, 1),
                (pred.anomaly_map[0, 0].numpy().T, "inferno", 0, 0.4),
                (None if pred.jacobian is None else np.log(np.clip(pred.jacobian[0, 0].numpy().T, 1e-3, None)),
                 "coolwarm", -0.5, 0.5),
            ]
            for c, (panel, cmap, vmin, vmax) in enumerate(panels):
                ax = axes[r][c]
                ax.set_xticks([])
                ax.set_yticks([])
                if panel is None:
                    ax.text(0.5, 0.5, "—", ha="center", va="center", transform=ax.transAxes)
                else:
                    ax.imshow(panel, cmap=cmap, vmin=vmin, vmax=vmax, origin="lower")
                if outline.any():
                    ax.contour(outline, levels=[0.5], colors="cyan", linewidths=0.6, origin="lower")
                if r == 0:
                    ax.set_title(columns[c], fontsize=8)
            label = scorer.name + ("" if lpr is None else f"\nslice LPR {lpr:.2f}")
            axes[r][0].set_ylabel(label, fontsize=7)
        row = test.meta[index][0]
        fig.suptitle(f"{dataset.name}, seed {seed}: {row.subject} ({lesion_type}), slice {test.meta[index][1].slice_index}",
                     fontsize=9)
        paths.append(save_figure(fig, out_dir / f"guidance_{lesion_type}.png", dpi=90))
    return paths
