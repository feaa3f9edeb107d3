"""Draw docs/img/phantom_examples.png: one test subject per lesion type of the phantom.

Rows are lesion types; columns are the image, its healthy counterpart, |image − healthy| and
the mask (red) over the image, each at the axial slice with the most separate lesion regions
(ties: the largest lesion area).

    .venv/bin/python scripts/phantom_figure.py                      # builds the 4 subjects it needs
    .venv/bin/python scripts/phantom_figure.py --manifest phantom/manifest.csv
"""
from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from anomorph.data.phantom import LESION_TYPES, PhantomConfig, build_phantom  # noqa: E402


def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.as_closest_canonical(nib.load(str(path))).dataobj, dtype=np.float32)


def _first_row_per_type(manifest: Path) -> dict[str, dict[str, str]]:
    with manifest.open(newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"] == "test" and r["lesion_type"]]
    chosen: dict[str, dict[str, str]] = {}
    for row in rows:
        chosen.setdefault(row["lesion_type"], row)
    return chosen


def draw(manifest: Path, out: Path) -> Path:
    """Render the example grid from the test rows of ``manifest`` into ``out`` (PNG)."""
    base = manifest.parent
    chosen = _first_row_per_type(manifest)
    kinds = [k for k in LESION_TYPES if k in chosen]
    figure, axes = plt.subplots(len(kinds), 4, figsize=(9.6, 2.5 * len(kinds)), squeeze=False)
    titles = ["image", "healthy counterpart", "|image − healthy|", "mask (red) on image"]
    for row_axes, kind in zip(axes, kinds):
        row = chosen[kind]
        image, healthy, mask = (_load(base / row[key]) for key in ("image", "healthy", "mask"))
        z = max(range(mask.shape[2]), key=lambda k: (ndimage.label(mask[:, :, k])[1], mask[:, :, k].sum()))
        image, healthy, mask = image[:, :, z].T, healthy[:, :, z].T, mask[:, :, z].T
        high = float(np.percentile(healthy, 99.5))
        difference = np.abs(image - healthy)
        overlay = np.ma.masked_where(mask == 0, mask)
        panels = [(image, "gray", 0, high), (healthy, "gray", 0, high),
                  (difference, "magma", 0, max(float(difference.max()), 1e-6)), (image, "gray", 0, high)]
        for axis, (panel, cmap, low, top) in zip(row_axes, panels):
            axis.imshow(panel, cmap=cmap, vmin=low, vmax=top, origin="lower", interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
        row_axes[3].imshow(overlay, cmap="autumn", alpha=0.55, origin="lower", interpolation="nearest")
        row_axes[0].set_ylabel(f"{kind}\n{row['subject']}, slice {z}", fontsize=9)
    for axis, title in zip(axes[0], titles):
        axis.set_title(title, fontsize=10)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", type=Path, default=None,
                        help="an existing phantom manifest; default: build test subjects 0-3 of the "
                             "default phantom (seed 0) in a temporary folder")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed when building (default 0)")
    parser.add_argument("--out", type=Path, default=Path("docs/img/phantom_examples.png"))
    args = parser.parse_args()
    if args.manifest is not None:
        print(f"wrote {draw(args.manifest, args.out)}")
        return
    # Test subjects 0..3 carry the four lesion types in order; they are identical to
    # sub-test-000..003 of the full phantom with the same seed.
    config = PhantomConfig(seed=args.seed, n_train=0, n_val_healthy=0, n_val_lesion=0,
                           n_test=len(LESION_TYPES), n_test_healthy=0)
    with tempfile.TemporaryDirectory() as folder:
        manifest = build_phantom(folder, config)
        print(f"wrote {draw(manifest, args.out)}")


if __name__ == "__main__":
    main()
