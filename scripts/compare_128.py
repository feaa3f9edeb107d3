"""Compare the 128² full-resolution-head run (benchmarks/phantom_128.yaml) with the 64² study, seed 0.

    .venv/bin/python scripts/compare_128.py

Reads the two per-seed metric files (64²: ``--reference``, a copy of the 64² study's
``runs/benchmark/phantom/seed0/metrics.csv``; 128²: ``--results-dir``/phantom/seed0/metrics.csv),
copies the 128² run's small result files to ``--copy`` (committed, so every number can be
traced) and writes LPR / HRR / pixel AUPRC per lesion kind, 64² next to 128², between the
``<!-- compare128:begin -->`` and ``<!-- compare128:end -->`` markers of ``--doc``
(the convention of scripts/update_results.py). Typed numbers: none; the text around the markers
only reads the table.
"""
from __future__ import annotations

import argparse
import csv
import math
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from update_results import replace  # noqa: E402

COMMAND = "OMP_WAIT_POLICY=PASSIVE anomorph benchmark --config benchmarks/phantom_128.yaml"
METHODS = ("morphaeus", "gating", "gating (oracle-guided)", "cost_masking", "cost_masking (oracle-guided)")
BASELINES = ("threshold", "oracle")
GROUPS = (("overall", "all"), ("lesion_type", "csf_like"), ("lesion_type", "large"),
          ("lesion_type", "mass_effect"), ("lesion_type", "multifocal"), ("size", "small"),
          ("size", "medium"), ("size", "large"))
METRICS = (("lpr", "LPR"), ("hrr", "HRR"), ("pixel_auprc", "pixel AUPRC"))
# source (under --results-dir) -> destination (under --copy); the "phantom/" level is dropped
# because .gitignore's "phantom/" would hide it
RESULT_FILES = {"phantom/seed0/metrics.csv": "seed0/metrics.csv", "phantom/seed0/metrics.json": "seed0/metrics.json",
                "results.csv": "results.csv", "results.md": "results.md", "paired.csv": "paired.csv",
                "paired.md": "paired.md"}
# the generated CSF-like guidance panel (seed 0), copied next to the 64² panels
FIGURE = ("phantom/figures/guidance_csf_like.png", "img/phantom128_guidance_csf_like.png")


def read_metrics(path: Path) -> dict[tuple[str, str, str], dict[str, float]]:
    """{(method, group_kind, group): {metric: value}} from a per-seed metrics.csv."""
    table = {}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            values = {}
            for key, text in row.items():
                if key in ("method", "group_kind", "group"):
                    continue
                try:
                    values[key] = float(text) if text not in ("", None) else math.nan
                except ValueError:
                    values[key] = math.nan
            table[(row["method"], row["group_kind"], row["group"])] = values
    return table


def fmt(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None or math.isnan(value) else format(value, spec)


def get(table, method: str, group: tuple[str, str], metric: str) -> float | None:
    row = table.get((method, *group))
    return None if row is None else row.get(metric)


def comparison_block(reference: dict, new: dict, reference_path: Path, new_path: Path) -> str:
    lines = [f"Command: `{COMMAND}`, then `.venv/bin/python scripts/compare_128.py`. Seed 0, test split, "
             f"the same seed-0 phantom at both sizes. 64²: `{reference_path}`; 128²: `{new_path}`. "
             "Δ = 128² − 64².", ""]
    for method in METHODS:
        if not any((method, *g) in new for g in GROUPS):
            lines += [f"**{method}**: not in the 128² run.", ""]
            continue
        lines.append(f"**{method}**")
        lines.append("")
        header = "| group |" + "".join(f" {label} 64² | {label} 128² | Δ |" for _, label in METRICS)
        lines.append(header)
        lines.append("|---|" + "---:|" * (3 * len(METRICS)))
        for group in GROUPS:
            cells = []
            for metric, _ in METRICS:
                old, cur = get(reference, method, group, metric), get(new, method, group, metric)
                delta = None if old is None or cur is None else cur - old
                cells += [fmt(old), fmt(cur), ("–" if delta is None or math.isnan(delta) else f"{delta:+.3f}")]
            lines.append(f"| {group[1] if group[0] != 'size' else 'size ' + group[1]} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("**Baselines** (pixel AUPRC; no deformation, so no LPR / HRR)")
    lines.append("")
    lines.append("| group |" + "".join(f" {m} 64² | {m} 128² |" for m in BASELINES))
    lines.append("|---|" + "---:|" * (2 * len(BASELINES)))
    for group in GROUPS:
        cells = []
        for method in BASELINES:
            cells += [fmt(get(reference, method, group, "pixel_auprc")), fmt(get(new, method, group, "pixel_auprc"))]
        lines.append(f"| {group[1] if group[0] != 'size' else 'size ' + group[1]} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Folding fraction (unguided, all test pixels): 64² "
                 f"{fmt(get(reference, 'morphaeus', ('overall', 'all'), 'folding_fraction'), '.2e')}, 128² "
                 f"{fmt(get(new, 'morphaeus', ('overall', 'all'), 'folding_fraction'), '.2e')}. "
                 "Per-subject paired differences with bootstrap CIs (vs the unguided 128² model, "
                 "3 test subjects per lesion kind): `benchmarks/results/phantom128/paired.md`.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path,
                        default=Path("benchmarks/results/phantom128/reference_64/seed0/metrics.csv"),
                        help="the 64² study's seed-0 metrics.csv")
    parser.add_argument("--results-dir", type=Path, default=Path("runs/benchmark128"),
                        help="output_dir of benchmarks/phantom_128.yaml")
    parser.add_argument("--copy", type=Path, default=Path("benchmarks/results/phantom128"),
                        help="where the 128² run's small result files are copied (committed)")
    parser.add_argument("--doc", type=Path, default=Path("docs/results.md"))
    args = parser.parse_args()
    for source, destination in RESULT_FILES.items():
        if (args.results_dir / source).is_file():
            (args.copy / destination).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(args.results_dir / source, args.copy / destination)
    figure = args.results_dir / FIGURE[0]
    if figure.is_file():
        shutil.copyfile(figure, args.doc.parent / FIGURE[1])
    new_path = args.copy / "seed0/metrics.csv"
    block = comparison_block(read_metrics(args.reference), read_metrics(new_path), args.reference, new_path)
    replace(args.doc, "compare128", block)
    print(block)


if __name__ == "__main__":
    main()
