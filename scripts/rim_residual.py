"""Where does anomaly-aware training add false positives? The anomaly map by distance to the lesion.

    .venv/bin/python scripts/rim_residual.py runs/benchmark_aware

An analysis of finished runs of ``benchmarks/phantom_aware.yaml`` (it chooses nothing): for
every seed of the main dataset, each trained row's anomaly map |x − x̃| on the **test** slices,
averaged over brain pixels in bands of Euclidean distance (pixels, model grid) from the nearest
lesion pixel — inside the lesion, then (0, 2.5], (2.5, 4.5], (4.5, 8.5] and more than 8.5 pixels
away on slices with a lesion — and over the brain of slices without a lesion. Outside the lesion the map is what
becomes false positives, so a row that holds healthy tissue next to lesions (their rim) shows
a higher map in the near bands than the unguided model, and one that holds healthy tissue
everywhere shows it in every band. Means over the slices of all seeds, and each row's ratio to
the unguided reference. Writes ``--out`` (Markdown) and the ``--marker`` pair (default ``aware-rim``)
of docs/results.md. Any study's output_dir and yaml work (``--config``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from update_results import publish  # noqa: E402

BANDS = (("inside", None, None), ("0–2.5 px", 0.0, 2.5), ("2.5–4.5 px", 2.5, 4.5), ("4.5–8.5 px", 4.5, 8.5),
         ("> 8.5 px", 8.5, float("inf")))


def band_means(maps, lesions, brains) -> dict[str, tuple[float, int]]:
    """Sum and count of the map per band, over slices (numpy arrays ``(N, H, W)``)."""
    from scipy.ndimage import distance_transform_edt

    sums = {name: [0.0, 0] for name, _, _ in BANDS}  # distance bands: low < d ≤ high
    sums["no lesion on the slice"] = [0.0, 0]
    for m, lesion, brain in zip(maps, lesions, brains):
        brain = brain > 0
        if not lesion.any():
            sums["no lesion on the slice"][0] += float(m[brain].sum())
            sums["no lesion on the slice"][1] += int(brain.sum())
            continue
        distance = distance_transform_edt(~(lesion > 0))
        for name, low, high in BANDS:
            band = (lesion > 0) if low is None else ((distance > low) & (distance <= high))
            band = band & brain
            sums[name][0] += float(m[band].sum())
            sums[name][1] += int(band.sum())
    return {k: (v[0], v[1]) for k, v in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="the benchmark's output_dir")
    parser.add_argument("--config", type=Path, default=Path("benchmarks/phantom_aware.yaml"))
    parser.add_argument("--dataset", default="phantom")
    parser.add_argument("--reference", default="morphaeus")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/phantom_aware/rim_residual.md"))
    parser.add_argument("--doc", type=Path, default=Path("docs/results.md"))
    parser.add_argument("--marker", default="aware-rim", help="the doc's marker pair to fill")
    args = parser.parse_args()

    import torch

    from anomorph.benchmark.runner import ensure_dataset, load_benchmark_config, seed_runs
    from anomorph.evaluation.evaluate import EvaluationData
    from anomorph.runs import load_run
    from anomorph.scoring import ModelScorer
    from anomorph.training.datamodule import slice_config

    config = load_benchmark_config(args.config)
    config.output_dir = str(args.results)
    dataset = next(d for d in config.datasets if d.name == args.dataset)
    chosen = json.loads((args.results / args.dataset / "selection" / "chosen.json").read_text())
    totals: dict[str, dict[str, list[float]]] = {}
    for seed in config.seeds:
        manifest = ensure_dataset(dataset, seed)
        runs = {name: path for name, (path, _) in seed_runs(config, dataset, seed, chosen).items()}
        data = None
        for name, run_dir in runs.items():
            network, run_config = load_run(run_dir)
            if data is None:
                data = EvaluationData.load(manifest, slice_config(run_config.data), config.calibration_fraction)
            scorer = ModelScorer(network, run_config)
            maps = []
            with torch.no_grad():
                for start in range(0, len(data.test), 64):
                    maps.append(scorer(data.test.images[start:start + 64],
                                       data.test.brain_masks[start:start + 64]).anomaly_map)
            result = band_means(torch.cat(maps)[:, 0].numpy(), data.test.masks[:, 0].numpy(),
                                data.test.brain_masks[:, 0].numpy())
            row = totals.setdefault(name, {})
            for band, (total, count) in result.items():
                acc = row.setdefault(band, [0.0, 0])
                acc[0] += total
                acc[1] += count
    names = list(totals)
    bands = list(next(iter(totals.values())))
    command = " ".join(["python scripts/rim_residual.py", *sys.argv[1:]])
    lines = [f"Generated by `{command}` (test split of {args.dataset}, seeds "
             f"{', '.join(map(str, config.seeds))}; mean anomaly map |x − x̃| per band of distance to the nearest lesion "
             f"pixel, brain pixels only; in brackets: the ratio to {args.reference}).\n",
             "| row | " + " | ".join(bands) + " |", "|---|" + "---|" * len(bands)]
    reference = {b: totals[args.reference][b][0] / max(totals[args.reference][b][1], 1) for b in bands}
    for name in names:
        cells = []
        for b in bands:
            mean = totals[name][b][0] / max(totals[name][b][1], 1)
            cells.append(f"{mean:.4f} ({mean / reference[b]:.2f})" if reference[b] > 0 else f"{mean:.4f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    publish(table, args.out, args.doc, args.marker)


if __name__ == "__main__":
    main()
