"""Combine per-seed ``metrics.json`` files into mean ± std tables (CSV, Markdown, HTML)."""
from __future__ import annotations

import csv
import html
import io
import json
import math
import platform
from pathlib import Path
from typing import Any

from ..data.io import atomic_write
from .statistics import paired_table


def dataset_seeds(config, dataset) -> list[int]:
    """The seeds run on ``dataset``: its own ``seeds`` (when set) or the benchmark's."""
    own = getattr(dataset, "seeds", None)
    return list(own) if own is not None else list(config.seeds)

COLUMNS = {  # metric key → column title; SPEC §4 / issue 6 columns first
    "pixel_auprc": "pixel AUPRC", "dice_at_val": "Dice@val", "slice_auroc": "slice AUROC",
    "lpr": "LPR", "hrr": "HRR", "folding_fraction": "folding", "pixel_auroc": "pixel AUROC",
    "dice_at_fpr": "Dice@5%FPR", "oracle_best_dice": "DICE* (oracle)", "slice_auprc": "slice AUPRC",
    "slice_fpr_at_95_tpr": "slice FPR@95TPR", "uncertainty_auroc": "u AUROC",
}
MARKDOWN_COLUMNS = ("pixel_auprc", "dice_at_val", "slice_auroc", "lpr", "hrr", "folding_fraction")


def _groups(metrics: dict[str, Any]):
    yield "overall", "all", metrics
    for name, sub in metrics.get("by_lesion_type", {}).items():
        yield "lesion_type", name, sub
    for name, sub in metrics.get("by_size", {}).items():
        yield "size", name, sub


def aggregate(config) -> list[dict[str, Any]]:
    """Rows (dataset, method, group_kind, group) with ``<metric>_mean``, ``_std`` and ``n_seeds``.

    std is the sample standard deviation over seeds (ddof = 1; 0 for a single seed); a metric
    undefined in some seed is averaged over the seeds where it is defined.
    """
    table: dict[tuple, dict[str, list[float]]] = {}
    order: list[tuple] = []
    for dataset in config.datasets:
        for seed in dataset_seeds(config, dataset):
            path = Path(config.output_dir) / dataset.name / f"seed{seed}" / "metrics.json"
            if not path.is_file():
                continue
            methods = json.loads(path.read_text())["methods"]
            for method, metrics in methods.items():
                for kind, group, values in _groups(metrics):
                    key = (dataset.name, method, kind, group)
                    if key not in table:
                        table[key] = {}
                        order.append(key)
                    for metric in COLUMNS:
                        value = values.get(metric)
                        if isinstance(value, (int, float)) and not math.isnan(float(value)):
                            table[key].setdefault(metric, []).append(float(value))
                    table[key].setdefault("_seeds", []).append(seed)
    rows = []
    for key in order:
        dataset, method, kind, group = key
        row: dict[str, Any] = {"dataset": dataset, "method": method, "group_kind": kind, "group": group,
                               "n_seeds": len(table[key]["_seeds"])}
        for metric in COLUMNS:
            values = table[key].get(metric, [])
            n = len(values)
            mean = sum(values) / n if n else None
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else (0.0 if n else None)
            row[f"{metric}_mean"], row[f"{metric}_std"] = mean, std
        rows.append(row)
    return rows


def _cell(row: dict[str, Any], metric: str) -> str:
    mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
    if mean is None:
        return "—"
    return f"{mean:.3f} ± {std:.3f}" if row["n_seeds"] > 1 else f"{mean:.3f}"


def to_markdown(rows: list[dict[str, Any]], columns=MARKDOWN_COLUMNS) -> str:
    """Markdown: one table per dataset for the overall rows, then one per lesion type."""
    out = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        subset = [r for r in rows if r["dataset"] == dataset]
        groups = [("overall", "all")] + [("lesion_type", g) for g in dict.fromkeys(
            r["group"] for r in subset if r["group_kind"] == "lesion_type")] + \
            [("size", g) for g in ("small", "medium", "large") if any(
                r["group_kind"] == "size" and r["group"] == g for r in subset)]
        for kind, group in groups:
            title = "all test slices" if kind == "overall" else f"{'lesion type' if kind == 'lesion_type' else 'lesion size'}: {group}"
            out.append(f"**{dataset} — {title}** (mean ± std over seeds)\n")
            out.append("| method | " + " | ".join(COLUMNS[c] for c in columns) + " |")
            out.append("|---|" + "---|" * len(columns))
            for r in subset:
                if r["group_kind"] == kind and r["group"] == group:
                    out.append(f"| {r['method']} | " + " | ".join(_cell(r, c) for c in columns) + " |")
            out.append("")
    return "\n".join(out)


def to_html(rows: list[dict[str, Any]], title: str, context: dict[str, Any]) -> str:
    head = "".join(f"<th>{html.escape(t)}</th>" for t in ["dataset", "method", "group", *COLUMNS.values()])
    body = []
    for r in rows:
        cells = [r["dataset"], r["method"], f"{r['group_kind']}: {r['group']}"] + [_cell(r, c) for c in COLUMNS]
        body.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    meta = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in context.items())
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
            "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td:nth-child(-n+3){text-align:left}"
            "</style></head><body>"
            f"<h1>{html.escape(title)}</h1><table>{meta}</table><p>mean ± std over seeds; DICE* is an oracle "
            f"(best threshold on test); the <i>oracle</i> method scores |x − healthy|.</p>"
            f"<table><tr>{head}</tr>{''.join(body)}</table></body></html>\n")


PAIRED_METRICS = {"pixel_auprc": "Δ pixel AUPRC", "dice_at_val": "Δ Dice@val"}


def paired_differences(config, n_resamples: int = 10000) -> list[dict[str, Any]]:
    """Per method: the paired difference (method − ``config.reference``) per test subject with a
    lesion, pooled over seeds (key ``seed<S>/<subject>``; every seed has its own data), with a
    bootstrap 95% CI that resamples subjects within each seed; overall and per lesion type."""
    rows: list[dict[str, Any]] = []
    for dataset in config.datasets:
        per_method: dict[str, dict[str, dict[str, Any]]] = {}
        for seed in dataset_seeds(config, dataset):
            path = Path(config.output_dir) / dataset.name / f"seed{seed}" / "metrics.json"
            if not path.is_file():
                continue
            for method, metrics in json.loads(path.read_text())["methods"].items():
                for subject, record in (metrics.get("per_subject") or {}).items():
                    per_method.setdefault(method, {})[f"seed{seed}/{subject}"] = record
        reference = per_method.get(config.reference)
        if reference is None:
            continue
        for method, records in per_method.items():
            if method == config.reference or set(records) != set(reference):
                continue
            for metric in PAIRED_METRICS:
                if not all(metric in r for r in records.values()) or not all(metric in r for r in reference.values()):
                    continue
                for row in paired_table(reference, records, metric, stratify=lambda key: key.split("/")[0],
                                        n_resamples=n_resamples):
                    rows.append({"dataset": dataset.name, "method": method, "reference": config.reference, **row})
    return rows


def _ci(row: dict[str, Any] | None) -> str:
    if row is None or row.get("mean") is None:
        return "—"
    if row.get("ci_low") is None:
        return f"{row['mean']:+.3f} (n = {row['n']})"
    mark = " *" if row["ci_low"] > 0 or row["ci_high"] < 0 else ""
    return f"{row['mean']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]{mark}"


def paired_markdown(rows: list[dict[str, Any]]) -> str:
    """One table per dataset and group (overall, each lesion type): method × Δ metric [95% CI]."""
    out = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        subset = [r for r in rows if r["dataset"] == dataset]
        reference = subset[0]["reference"]
        groups = list(dict.fromkeys(r["group"] for r in subset))
        for group in groups:
            n = max((r["n"] for r in subset if r["group"] == group), default=0)
            title = "all lesion subjects" if group == "overall" else f"lesion type: {group}"
            out.append(f"**{dataset} — {title}**: method − {reference}, mean over {n} test subjects "
                       f"(all seeds) [bootstrap 95% CI, subjects resampled within each seed]; * = CI excludes 0\n")
            out.append("| method | " + " | ".join(PAIRED_METRICS.values()) + " |")
            out.append("|---|" + "---|" * len(PAIRED_METRICS))
            for method in dict.fromkeys(r["method"] for r in subset):
                cells = []
                for metric in PAIRED_METRICS:
                    match = [r for r in subset if r["method"] == method and r["group"] == group and r["metric"] == metric]
                    cells.append(_ci(match[0] if match else None))
                out.append(f"| {method} | " + " | ".join(cells) + " |")
            out.append("")
    return "\n".join(out)


def write_tables(rows: list[dict[str, Any]], config, elapsed_s: float | None = None) -> dict[str, Path]:
    """Write results.csv, results.md, results.html and the paired comparison (paired.csv,
    paired.md) into the benchmark's output folder."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    context = {"benchmark": config.name, "seeds": ", ".join(map(str, config.seeds)),
               "machine": f"{platform.node()} ({platform.machine()}, {platform.processor() or 'cpu'})"}
    if elapsed_s is not None:
        context["wall time of this invocation"] = f"{elapsed_s / 60:.1f} min"
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    files = {
        "csv": atomic_write(out / "results.csv", lambda tmp: Path(tmp).write_text(buffer.getvalue())),
        "markdown": atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(to_markdown(rows))),
        "html": atomic_write(out / "results.html", lambda tmp: Path(tmp).write_text(
            to_html(rows, f"{config.name} results", context))),
    }
    paired = paired_differences(config)
    if paired:
        fields = list(dict.fromkeys(k for r in paired for k in r))
        paired_buffer = io.StringIO()
        writer = csv.DictWriter(paired_buffer, fieldnames=fields)
        writer.writeheader()
        writer.writerows(paired)
        files["paired_csv"] = atomic_write(out / "paired.csv", lambda tmp: Path(tmp).write_text(paired_buffer.getvalue()))
        files["paired_markdown"] = atomic_write(out / "paired.md", lambda tmp: Path(tmp).write_text(paired_markdown(paired)))
    return files
