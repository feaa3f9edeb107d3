"""Issue 12's targets, checked from a benchmark's own output (no number typed by hand).

    .venv/bin/python scripts/guided_targets.py runs/benchmark

1. The guided row with a real u is chosen on **val**: among the rows whose mask comes from an
   estimator (every guided method of ``chosen.json`` except the ``tto`` control), the one with the
   best val criterion in ``search.csv`` (with ``selection.min_lpr``: among those whose chosen
   values met it on val, if any did). Test numbers never choose it.
2. On the test split of the main dataset (pooled seeds, ``paired.csv``): the paired difference
   to the unguided reference in pixel AUPRC and Dice@val with its bootstrap 95% CI (target:
   both CIs above 0), and per lesion kind (target: no CI entirely below 0).
3. ``results.csv``: LPR of that row on every lesion kind (target ≥ 0.95) and its HRR over all
   test slices (target ≥ 0.9 × the reference's).
4. Gap: its Δ AUPRC over the Δ AUPRC of the best oracle-guided row (target ≥ 0.5); the ``tto``
   control's Δ is shown beside it (the oracle row is confounded if tto alone gains as much).
5. The check datasets (``frozen_from`` the main one): the sign of the same row's Δ AUPRC and
   Δ Dice@val (target: positive, as on the main dataset; not met when the main dataset shows
   no gain with its CI above 0, since then there is no improvement whose sign could be kept).

Writes ``<results>/targets.md`` and replaces the ``targets`` markers in docs/results.md
(``--marker NAME``: the ``NAME`` markers, e.g. ``val128-targets`` for the 128² study).
``--method NAME`` reads the same targets for another guided row instead of the val rule's
(e.g. the runner-up), for comparison only: the table then says it is not the row the rule
chose, writes ``targets_<NAME>.md``, and the rule's row stays the study's answer.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from update_results import replace  # noqa: E402

CONTROLS = ("tto",)


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _f(value: str | None) -> float | None:
    return None if value in (None, "") else float(value)


def meets_min_lpr(row: dict[str, str], chosen: dict) -> bool:
    """Whether a chosen search row met ``selection.min_lpr`` on val (True without the constraint):
    the search's own verdict for guided rows, the row's ``min_kind_lpr`` for trained ones."""
    if row["method"] in chosen.get("meets_min_lpr", {}):
        return bool(chosen["meets_min_lpr"][row["method"]])
    min_lpr = json.loads(chosen.get("setup") or "{}").get("selection", {}).get("min_lpr")
    if min_lpr is None:
        return True
    value = _f(row.get("min_kind_lpr"))
    return value is not None and value >= float(min_lpr)


def best_real_u_row(selection: Path, candidates: list[str] | None = None,
                    controls: tuple[str, ...] = CONTROLS) -> tuple[str, float]:
    """The rule's row: among ``candidates`` (default: every guided method but the controls), the
    best val criterion, rows that met ``selection.min_lpr`` first."""
    chosen = json.loads((selection / "chosen.json").read_text())
    names = set(candidates) if candidates else set(chosen["guidance"]) - set(controls)
    rows = [r for r in _read(selection / "search.csv") if r["chosen"] == "True" and r["method"] in names]
    if not rows:
        raise SystemExit(f"{selection / 'search.csv'}: no chosen row of {sorted(names)}")
    best = max(rows, key=lambda r: (meets_min_lpr(r, chosen), _f(r[chosen["criterion"]]) or float("-inf")))
    return best["method"], float(best[chosen["criterion"]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="benchmark output_dir (or its copy in benchmarks/results)")
    parser.add_argument("--dataset", default="phantom")
    parser.add_argument("--reference", default="morphaeus")
    parser.add_argument("--doc", type=Path, default=Path("docs/results.md"))
    parser.add_argument("--marker", default="targets", help="the doc's marker pair to fill (default: targets)")
    parser.add_argument("--method", default=None, help="read the targets for this guided row instead of the val "
                                                       "rule's (for comparison; the table says so)")
    parser.add_argument("--candidates", nargs="+", default=None,
                        help="the rows the val rule chooses among (default: every guided row but the controls); "
                             "e.g. a trained method that needs no u")
    parser.add_argument("--controls", nargs="+", default=["tto", "tto_matched"],
                        help="control rows shown beside the gap (default: tto tto_matched)")
    args = parser.parse_args()

    ruled, val_score = best_real_u_row(args.results / args.dataset / "selection", args.candidates)
    method = args.method or ruled
    paired = _read(args.results / "paired.csv")
    results = _read(args.results / "results.csv")

    def diff(dataset: str, row: str, metric: str, group: str = "overall") -> dict[str, str] | None:
        return next((r for r in paired if r["dataset"] == dataset and r["method"] == row and r["metric"] == metric
                     and r["group"] == group), None)

    def ci(r: dict[str, str] | None) -> str:
        return "—" if r is None else f"{float(r['mean']):+.3f} [{float(r['ci_low']):+.3f}, {float(r['ci_high']):+.3f}]"

    among = (f"Row chosen on val among {', '.join(args.candidates)}" if args.candidates
             else "Row with a real u chosen on val")
    heading = (f"{among}: **{method}** (val pixel AUPRC {val_score:.3f}; search: "
               f"`{args.dataset}/selection/search.csv`)." if method == ruled else
               f"Row **{method}**, named on the command line for comparison: **not** the row the val rule chose "
               f"(**{ruled}**, val pixel AUPRC {val_score:.3f}; search: `{args.dataset}/selection/search.csv`).")
    lines = [f"{heading} Test split, {args.dataset}, paired against {args.reference}.\n",
             "| target | measured | met |", "|---|---|---|"]
    met_all = []

    def add(target: str, measured: str, met: bool | None) -> None:
        lines.append(f"| {target} | {measured} | {'—' if met is None else ('yes' if met else '**no**')} |")
        if met is not None:
            met_all.append(met)

    for metric, label in (("pixel_auprc", "pixel AUPRC"), ("dice_at_val", "Dice@val")):
        r = diff(args.dataset, method, metric)
        add(f"Δ {label} overall, 95% CI above 0", ci(r), None if r is None else float(r["ci_low"]) > 0)
    kinds = sorted({r["group"] for r in paired if r["dataset"] == args.dataset and r["group"] != "overall"})
    worse = [f"{k} ({label})" for k in kinds for metric, label in (("pixel_auprc", "AUPRC"), ("dice_at_val", "Dice"))
             if (d := diff(args.dataset, method, metric, k)) is not None and float(d["ci_high"]) < 0]
    add("not significantly worse on any lesion kind", ", ".join(worse) or "none worse", not worse)

    def result(row: str, group_kind: str, group: str, column: str) -> float | None:
        hit = next((r for r in results if r["dataset"] == args.dataset and r["method"] == row
                    and r["group_kind"] == group_kind and r["group"] == group), None)
        return None if hit is None else _f(hit.get(column))

    lprs = {k: result(method, "lesion_type", k, "lpr_mean") for k in kinds}
    add("LPR ≥ 0.95 on every kind", ", ".join(f"{k} {v:.3f}" for k, v in lprs.items() if v is not None),
        all(v is not None and v >= 0.95 for v in lprs.values()))
    hrr, hrr_ref = result(method, "overall", "all", "hrr_mean"), result(args.reference, "overall", "all", "hrr_mean")
    if hrr is not None and hrr_ref:
        add("HRR ≥ 0.9 × unguided", f"{hrr:.3f} vs {hrr_ref:.3f} (× {hrr / hrr_ref:.2f})", hrr >= 0.9 * hrr_ref)
    oracle_rows = [r for r in paired if r["dataset"] == args.dataset and r["metric"] == "pixel_auprc"
                   and r["group"] == "overall" and r["method"].endswith("(oracle-guided)")]
    if oracle_rows:
        best = max(oracle_rows, key=lambda r: float(r["mean"]))
        gain = diff(args.dataset, method, "pixel_auprc")
        controls = "; ".join(f"control {c}: {ci(diff(args.dataset, c, 'pixel_auprc'))}" for c in args.controls
                             if diff(args.dataset, c, "pixel_auprc") is not None)
        if gain is not None:
            share = float(gain["mean"]) / float(best["mean"])
            add("closes ≥ half of the gap to the best oracle-guided row",
                f"{share:.2f} of {best['method']}'s {float(best['mean']):+.3f} ({controls})", share >= 0.5)
    checks = sorted({r["dataset"] for r in paired} - {args.dataset})
    for dataset in checks:
        for metric, label in (("pixel_auprc", "pixel AUPRC"), ("dice_at_val", "Dice@val")):
            main_sign = diff(args.dataset, method, metric)
            r = diff(dataset, method, metric)
            if r is None or main_sign is None:
                add(f"{dataset}: same sign of Δ {label}", "not run", None)
                continue
            # the target keeps the sign of an *improvement*: without a gain on the main dataset
            # (CI above 0) there is nothing to keep; a loss, or a tie, on both is not a success
            kept = float(main_sign["ci_low"]) > 0 and float(r["mean"]) > 0
            add(f"{dataset} (frozen choices): keeps the sign of the gain in Δ {label}", ci(r), kept)
    lines.append(f"\n{sum(met_all)} of {len(met_all)} targets met.")
    command = f"python scripts/guided_targets.py {args.results}" + (
        f" --marker {args.marker}" if args.marker != "targets" else "") + (f" --method {args.method}" if args.method else "") + (
        f" --candidates {' '.join(args.candidates)}" if args.candidates else "") + (
        f" --controls {' '.join(args.controls)}" if args.controls != ["tto", "tto_matched"] else "")
    table = f"Generated by `{command}`.\n\n" + "\n".join(lines)
    (args.results / ("targets.md" if method == ruled else f"targets_{method}.md")).write_text(table + "\n")
    replace(args.doc, args.marker, table)
    print(table)


if __name__ == "__main__":
    main()
