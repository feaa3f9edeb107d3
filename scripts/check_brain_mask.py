"""Derived vs given brain masks on a phantom: Dice and lesion coverage per subject (issue 13).

    .venv/bin/python scripts/check_brain_mask.py [OUT_DIR] [SIZE] [N_SLICES]

Builds the phantom (seed 0; lesion subjects of every type) into OUT_DIR (default
runs/brain_mask_check) unless it exists, then prints, over all subjects, the Dice of
:func:`anomorph.data.slices.derive_brain_mask` against the phantom's brain mask and the
fraction of lesion voxels the derived mask covers (min and pooled).
"""
import sys
from pathlib import Path

import numpy as np

from anomorph.data.io import load_image
from anomorph.data.manifest import read_manifest
from anomorph.data.phantom import PhantomConfig, build_phantom
from anomorph.data.slices import derive_brain_mask

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/brain_mask_check")
size = int(sys.argv[2]) if len(sys.argv) > 2 else 64
n_slices = int(sys.argv[3]) if len(sys.argv) > 3 else 8
manifest = out / "manifest.csv"
if not manifest.is_file():
    manifest = build_phantom(out, PhantomConfig(size=size, n_slices=n_slices, seed=0, n_train=4, n_val_healthy=1,
                                                n_val_lesion=4, n_test=16, n_test_healthy=2))
dices, covered, total, worst = [], 0, 0, 1.0
for row in read_manifest(manifest):
    image, _ = load_image(row.image)
    given = load_image(row.brain_mask)[0] > 0
    derived = derive_brain_mask(image)
    dices.append(2 * np.sum(derived & given) / (derived.sum() + given.sum()))
    if row.mask is not None:
        lesion = load_image(row.mask)[0] > 0
        if lesion.any():
            covered += int(np.sum(lesion & derived))
            total += int(lesion.sum())
            worst = min(worst, float(np.sum(lesion & derived) / lesion.sum()))
print(f"{len(dices)} subjects ({size}², {n_slices} slices): Dice derived vs given: min {min(dices):.4f}, "
      f"mean {np.mean(dices):.4f}")
print(f"lesion voxels inside the derived mask: pooled {covered / max(total, 1):.4f} ({covered}/{total}), "
      f"worst subject {worst:.4f}")
