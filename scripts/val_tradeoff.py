"""Issue 12, why the LPR target is missed: every val setting's pixel AUPRC against its LPR.

    .venv/bin/python scripts/val_tradeoff.py

Reads the val searches that chose the guidance values (``search.csv`` written by
``anomorph benchmark``: one row per setting of each method's grid, val metrics of seed 0) and
draws, per study, val pixel AUPRC (y) against val LPR (x) for every setting of every guided
method, the chosen one of each method ringed, with the LPR target (0.95) as a line. The table
beside it gives, per method, the val-chosen setting (best AUPRC), the best AUPRC among the
settings with val LPR ≥ 0.95, and the highest val LPR reached. Val only: no test number is read.

Writes ``--figure`` (default ``docs/img/val_tradeoff.png``) and the ``--marker`` markers
(default ``val-tradeoff``) of ``--doc`` (default ``docs/results.md``). ``--lpr-column
min_kind_lpr`` uses the worst lesion kind's val LPR (the quantity of ``selection.min_lpr``;
searches written since it exists) instead of the LPR over all lesion slices.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from update_results import replace  # noqa: E402

STUDIES = (
    "64²=benchmarks/results/phantom/selection/search.csv",
    "128²=benchmarks/results/phantom128val/phantom/selection/search.csv",
)
LPR_TARGET = 0.95


def read_search(path: Path, lpr_column: str = "lpr") -> dict[str, list[dict[str, object]]]:
    """Guided methods' settings: ``{method: [{"params", "auprc", "lpr", "hrr", "chosen"}, …]}``;
    of a trained method (the unguided reference) only its chosen configuration."""
    rows: dict[str, list[dict[str, object]]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            kind = json.loads(row["setup"]).get("kind")
            if row.get(lpr_column) in (None, "", "nan") or not (kind == "guided" or (kind == "train" and row["chosen"] == "True")):
                continue
            rows.setdefault(row["method"], []).append({
                "params": json.loads(row["params"]), "auprc": float(row["pixel_auprc"]),
                "lpr": float(row[lpr_column]), "hrr": float(row["hrr"]), "chosen": row["chosen"] == "True"})
    return rows


def _setting(entry: dict[str, object]) -> str:
    params = dict(entry["params"])  # type: ignore[arg-type]
    keep = {k: v for k, v in params.items() if k in ("estimator", "threshold", "map_lambda", "dilation")}
    return ", ".join(f"{k} {v}" for k, v in keep.items())


def table(studies: dict[str, dict[str, list[dict[str, object]]]]) -> str:
    lines = ["| study | method | settings | val-chosen: AUPRC / LPR | best AUPRC with LPR ≥ 0.95 | highest LPR (its AUPRC) |",
             "|---|---|---|---|---|---|"]
    for label, methods in studies.items():
        for method, entries in sorted(methods.items()):
            chosen = next((e for e in entries if e["chosen"]), None)
            meeting = [e for e in entries if e["lpr"] >= LPR_TARGET]
            best_meeting = max(meeting, key=lambda e: e["auprc"]) if meeting else None
            highest = max(entries, key=lambda e: e["lpr"])
            lines.append(
                f"| {label} | {method} | {len(entries)} | "
                + ("—" if chosen is None else f"{chosen['auprc']:.3f} / {chosen['lpr']:.3f}") + " | "
                + ("none" if best_meeting is None else f"{best_meeting['auprc']:.3f} ({_setting(best_meeting)})")
                + f" | {highest['lpr']:.3f} ({highest['auprc']:.3f}) |")
    return "\n".join(lines)


def figure(studies: dict[str, dict[str, list[dict[str, object]]]], path: Path, lpr_label: str = "val LPR") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(studies), figsize=(5.2 * len(studies), 4.4), squeeze=False)
    colours = plt.get_cmap("tab10")
    names = sorted({m for methods in studies.values() for m in methods})
    for ax, (label, methods) in zip(axes[0], studies.items()):
        for method, entries in sorted(methods.items()):
            if len(entries) == 1 and not entries[0]["params"]:  # a trained, unguided reference
                ax.scatter([entries[0]["lpr"]], [entries[0]["auprc"]], marker="X", s=90, color="k",
                           label=f"{method} (unguided)")
                continue
            colour = colours(names.index(method) % 10)
            ax.scatter([e["lpr"] for e in entries], [e["auprc"] for e in entries], s=14, alpha=0.6,
                       color=colour, label=method)
            for e in entries:
                if e["chosen"]:
                    ax.scatter([e["lpr"]], [e["auprc"]], s=110, facecolors="none", edgecolors=colour, linewidths=2)
        ax.axvline(LPR_TARGET, color="k", linestyle="--", linewidth=1)
        ax.set_xlabel(f"{lpr_label} (lesion preservation ratio)")
        ax.set_ylabel("val pixel AUPRC")
        ax.set_title(f"{label}\nevery val setting (ringed: chosen)", fontsize=10)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", action="append", metavar="LABEL=SEARCH_CSV",
                        help=f"a val search to draw (repeatable; default: {', '.join(STUDIES)})")
    parser.add_argument("--figure", type=Path, default=Path("docs/img/val_tradeoff.png"))
    parser.add_argument("--doc", type=Path, default=Path("docs/results.md"))
    parser.add_argument("--marker", default="val-tradeoff")
    parser.add_argument("--lpr-column", choices=("lpr", "min_kind_lpr"), default="lpr")
    args = parser.parse_args()
    studies = {}
    for spec in args.study or STUDIES:
        label, _, path = spec.partition("=")
        if not path or not Path(path).is_file():
            raise SystemExit(f"--study {spec!r}: expected LABEL=PATH to an existing search.csv")
        studies[label] = read_search(Path(path), args.lpr_column)
    lpr_label = "val LPR" if args.lpr_column == "lpr" else "val LPR of the worst lesion kind"
    figure(studies, args.figure, lpr_label)
    options = "".join(f" --study '{spec}'" for spec in args.study or []) + (
        f" --figure {args.figure}" if args.figure != Path("docs/img/val_tradeoff.png") else "") + (
        f" --marker {args.marker}" if args.marker != "val-tradeoff" else "") + (
        f" --lpr-column {args.lpr_column}" if args.lpr_column != "lpr" else "")
    block = (f"Generated by `python scripts/val_tradeoff.py{options}` ({lpr_label}; val searches: "
             + ", ".join(f"`{s.partition('=')[2]}`" for s in (args.study or STUDIES))
             + f"). Figure: `{args.figure}`.\n\n" + table(studies))
    replace(args.doc, args.marker, block)
    print(block)


if __name__ == "__main__":
    main()
