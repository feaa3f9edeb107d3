"""``report.html``: a self-contained, offline HTML report of evaluation results (SPEC §4).

:func:`write_report` writes ``out_dir/report.html`` and PNG figures under ``out_dir/figures/``
(referenced by relative paths, so the folder can be copied and opened anywhere): run context,
metric tables (overall, per lesion type, per size tertile), ROC and PR curves of every method
overlaid, and per-example panels (one row per method; columns x, x̂, x̃, log det Jφ with the
warped grid, uncertainty, anomaly map, ground truth). No JavaScript, no external resources.

Display convention: arrays are indexed ``[x, y]`` in RAS canonical space; they are shown as
``array.T`` with ``origin="lower"`` so that anterior is up and right is on the right of the
screen's x axis (as :func:`figures.save_reconstruction_grid` does).
"""
from __future__ import annotations

import datetime as _dt
import html
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..data.io import atomic_write
from .figures import plt, save_figure

# lesion-size bins in table order; equal to anomorph.evaluation.metrics.SIZE_BINS (reporting sits
# below evaluation in the package layers, so it does not import it; tests/test_imports.py checks)
SIZE_BINS = ("small", "medium", "large")

if TYPE_CHECKING:  # pragma: no cover
    from ..evaluation.evaluate import Example, MethodResult

__all__ = ["write_report", "METRIC_COLUMNS"]

FIGURE_DPI = 90

# (key, header, description (hover title), better: "max" | "min" | None (never bolded))
METRIC_COLUMNS: tuple[tuple[str, str, str, str | None], ...] = (
    ("pixel_auroc", "AUROC", "pixel-level ROC AUC of the anomaly map inside the brain mask", "max"),
    ("pixel_auprc", "AUPRC", "pixel-level average precision inside the brain mask", "max"),
    ("dice_at_val", "Dice@val", "Dice on test at the threshold maximising Dice on val (the honest number)", "max"),
    ("dice_at_fpr", "Dice@5%FPR", "Dice on test at the threshold giving 5% false positives on healthy val pixels",
     "max"),
    ("oracle_best_dice", "DICE*", "oracle (best threshold on test): best Dice over all thresholds on test — "
     "NOT an honest score", "max"),
    ("slice_auroc", "slice AUROC", "slice-level ROC AUC (slice score = fixed reduction of the map)", "max"),
    ("slice_auprc", "slice AUPRC", "slice-level average precision", "max"),
    ("slice_fpr_at_95_tpr", "FPR@95TPR", "slice-level false-positive rate at 95% true-positive rate "
     "(lower is better)", "min"),
    ("uncertainty_auroc", "unc. AUROC", "pixel ROC AUC of the uncertainty u alone against the mask", "max"),
    ("uncertainty_auprc", "unc. AUPRC", "pixel average precision of the uncertainty u alone", "max"),
    ("lpr", "LPR", "lesion preservation ratio Σ_lesion|x−x̃| / Σ_lesion|x−x̂|: 1 = deformation kept the "
     "lesion, 0 = registered it away (not ranked)", None),
    ("hrr", "HRR", "healthy residual reduction 1 − Σ_healthy|x−x̃| / Σ_healthy|x−x̂| (not ranked)", None),
    ("folding_fraction", "folding", "fraction of brain pixels with det Jφ ≤ 0 (lower is better)", "min"),
    ("mean_displacement_lesion", "|d| lesion", "mean displacement magnitude in the lesion, pixels (not ranked)",
     None),
    ("mean_displacement_healthy", "|d| healthy", "mean displacement magnitude in healthy brain, pixels "
     "(not ranked)", None),
    ("n_slices", "slices", "number of test slices in this group", None),
    ("n_abnormal_slices", "abnormal", "number of abnormal test slices in this group", None),
)
_ALWAYS = {"pixel_auroc", "pixel_auprc", "dice_at_val", "dice_at_fpr", "oracle_best_dice", "slice_auroc",
           "slice_auprc", "slice_fpr_at_95_tpr", "n_slices"}
_INTEGER = {"n_slices", "n_abnormal_slices"}
DASH = "—"

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:1.5em auto;
max-width:1500px;padding:0 1em;color:#222;font-size:14px}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ccc}
h3{font-size:1.05em;margin-top:1.2em}
table{border-collapse:collapse;margin:.4em 0 1em 0}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:right;vertical-align:top}
th{background:#f3f3f3;font-weight:600}td.name,th.name{text-align:left}
table.context td,table.context th{text-align:left;font-family:ui-monospace,monospace;font-size:12px}
table.context td{white-space:pre-wrap;word-break:break-all;max-width:1100px}
tr.oracle td{background:#fff6e0;font-style:italic}tr.group td{background:#eef3fa;text-align:left;font-weight:600}
td.undef{color:#999;cursor:help}small{color:#666;font-weight:normal}
.note{color:#555;font-size:.92em;max-width:1100px}
figure{margin:.5em 0 1.5em 0}figcaption{color:#444;font-size:.92em}
img{max-width:100%;height:auto;border:1px solid #eee}
"""


# ---------------------------------------------------------------------------------- helpers
def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-").lower() or "x"


def _is_oracle(name: str) -> bool:
    return "oracle" in name.lower()


def _oracle_note(name: str) -> str:
    lowered = name.lower()
    if lowered == "oracle":
        return ("oracle: scores |x − healthy| with the true healthy image — the limit of any "
                "reconstruction method on this data; excluded from ranking")
    if "oracle-guided" in lowered or "oracle_guided" in lowered:
        return ("oracle-guided: guidance mask m = dilated ground-truth mask instead of the uncertainty "
                "estimate — the limit of any uncertainty estimator for this strategy; excluded from ranking")
    return "uses ground truth (an oracle); excluded from ranking"


def _finite(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _format(value: float, key: str) -> str:
    if key in _INTEGER:
        return str(int(round(value)))
    magnitude = abs(value)
    if magnitude == 0:
        return "0"
    if magnitude < 1e-3 or magnitude >= 1e4:
        return f"{value:.2e}"
    return f"{value:.3f}"


def _cell(metrics: Mapping[str, Any] | None, key: str, method: str) -> tuple[float | None, str, str | None]:
    """(value for ranking, display text, hover reason when undefined)."""
    if metrics is None:
        return None, DASH, f"no metrics for {method} in this group"
    if key not in metrics:
        return None, DASH, f"not applicable to {method}"
    raw = metrics[key]
    value = _finite(raw)
    if value is None:
        reason = getattr(raw, "reason", None) or (metrics.get("undefined") or {}).get(key) or "undefined"
        return None, DASH, str(reason)
    text = _format(value, key)
    std = _finite(metrics.get(f"{key}_std"))
    if std is not None:
        text += f" ± {_format(std, key)}"
    return value, text, None


def _columns(groups: Sequence[Mapping[str, Any] | None]) -> list[tuple[str, str, str, str | None]]:
    present = set()
    for metrics in groups:
        if metrics:
            present.update(k for k in metrics if not k.endswith("_std"))
    return [c for c in METRIC_COLUMNS if c[0] in _ALWAYS or c[0] in present]


def _header_cell(key: str, label: str, description: str, better: str | None) -> str:
    arrow = {"max": " ↑", "min": " ↓"}.get(better or "", "")
    extra = "<br><small>oracle (best threshold on test)</small>" if key == "oracle_best_dice" else ""
    return f'<th title="{_e(description)}">{_e(label + arrow)}{extra}</th>'


def _metric_rows(rows: Sequence[tuple[str, Mapping[str, Any] | None]],
                 columns: Sequence[tuple[str, str, str, str | None]]) -> list[str]:
    """``<tr>`` lines for (method, metrics) rows; the best non-oracle value per column is bold."""
    cells = {name: {key: _cell(metrics, key, name) for key, *_ in columns} for name, metrics in rows}
    best: dict[str, float] = {}
    for key, _, _, better in columns:
        if better is None:
            continue
        values = [cells[name][key][0] for name, _ in rows if not _is_oracle(name)]
        values = [v for v in values if v is not None]
        if len(values) >= 1:
            best[key] = max(values) if better == "max" else min(values)
    out = []
    for name, _ in rows:
        oracle = _is_oracle(name)
        title = f' title="{_e(_oracle_note(name))}"' if oracle else ""
        if oracle:
            limit = ("limit of any reconstruction method" if name.lower() == "oracle"
                     else "limit of any uncertainty estimator" if "guided" in name.lower() else "uses ground truth")
            label = _e(name) + f" <small>(oracle: {_e(limit)}; not ranked)</small>"
        else:
            label = _e(name)
        tds = [f'<td class="name"{title}>{label}</td>']
        for key, *_ in columns:
            value, text, reason = cells[name][key]
            if reason is not None:
                tds.append(f'<td class="undef" title="{_e(reason)}">{_e(text)}</td>')
            elif not oracle and key in best and value is not None and value == best[key]:
                tds.append(f"<td><b>{_e(text)}</b></td>")
            else:
                tds.append(f"<td>{_e(text)}</td>")
        out.append(f'<tr class="{"oracle" if oracle else "method"}">' + "".join(tds) + "</tr>")
    return out


def _table_html(header_name: str, columns, body: list[str]) -> str:
    head = f'<tr><th class="name">{_e(header_name)}</th>' + "".join(_header_cell(*c) for c in columns) + "</tr>"
    return "<table class=\"metrics\">\n<thead>" + head + "</thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody></table>"


def _overall_table(results: Sequence["MethodResult"]) -> str:
    rows = [(r.name, r.metrics) for r in results]
    columns = _columns([m for _, m in rows])
    return _table_html("method", columns, _metric_rows(rows, columns))


def _grouped_table(results: Sequence["MethodResult"], breakdown: str, order: Sequence[str] = ()) -> str | None:
    names: list[str] = [g for g in order if any(g in (r.metrics.get(breakdown) or {}) for r in results)]
    for r in results:
        for g in (r.metrics.get(breakdown) or {}):
            if g not in names:
                names.append(g)
    if not names:
        return None
    all_groups = [(r.metrics.get(breakdown) or {}).get(g) for g in names for r in results]
    columns = _columns(all_groups)
    body: list[str] = []
    for g in names:
        body.append(f'<tr class="group"><td colspan="{len(columns) + 1}">{_e(g)}</td></tr>')
        body.extend(_metric_rows([(r.name, (r.metrics.get(breakdown) or {}).get(g)) for r in results], columns))
    return _table_html("method", columns, body)


# ---------------------------------------------------------------------------------- curves
def _curve_figure(results: Sequence["MethodResult"], kind: str, path: Path) -> Path | None:
    x_key, y_key, metric, label = (("fpr", "tpr", "pixel_auroc", "AUROC") if kind == "roc"
                                   else ("recall", "precision", "pixel_auprc", "AUPRC"))
    drawn = [r for r in results if (r.curves or {}).get(kind, {}).get(x_key)]
    if not drawn:
        return None
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    cycle = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    for i, r in enumerate(drawn):
        curve = r.curves[kind]
        value = _finite(r.metrics.get(metric))
        text = f"{r.name} ({label} {value:.3f})" if value is not None else f"{r.name} ({label} —)"
        oracle = _is_oracle(r.name)
        ax.plot(curve[x_key], curve[y_key], lw=1.4, ls="--" if oracle else "-",
                color="k" if oracle else cycle[i % len(cycle)], label=text + (" [oracle]" if oracle else ""))
    if kind == "roc":
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls=":", label="chance")
        ax.set_xlabel("false-positive rate (pixels)")
        ax.set_ylabel("true-positive rate")
        ax.set_title("pixel ROC (inside brain mask)", fontsize=10)
    else:
        prevalence = [_finite(r.metrics.get("n_anomalous_pixels")) for r in drawn]
        totals = [_finite(r.metrics.get("n_pixels")) for r in drawn]
        if prevalence[0] is not None and totals[0]:
            base = prevalence[0] / totals[0]
            ax.axhline(base, color="0.6", lw=0.8, ls=":", label=f"chance ({base:.3f})")
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title("pixel precision–recall (inside brain mask)", fontsize=10)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right" if kind == "roc" else "lower left", framealpha=0.85)
    return save_figure(fig, path, dpi=FIGURE_DPI)


# ---------------------------------------------------------------------------------- examples
_PANEL_COLUMNS = ("input x", "pseudo-healthy x̂", "warped x̃", "log det Jφ + warped grid",
                  "uncertainty u", "anomaly map", "ground truth (red) on x")


def _percentile(arrays: list[np.ndarray], brain: np.ndarray | None, q: float = 99.0) -> float | None:
    values = []
    for a in arrays:
        a = np.asarray(a, dtype=np.float64)
        inside = a[brain > 0] if brain is not None and brain.shape == a.shape and (brain > 0).any() else a.ravel()
        inside = inside[np.isfinite(inside)]
        if inside.size:
            values.append(inside)
    if not values:
        return None
    return float(np.percentile(np.concatenate(values), q))


def _log_jacobian(prediction: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """(log det Jφ with det clipped at 1e-3, folded mask) from ``jacobian`` or the displacement."""
    det = prediction.get("jacobian")
    if det is None and prediction.get("displacement") is not None:
        d = np.asarray(prediction["displacement"], dtype=np.float64)
        g0, g1 = np.gradient(d[0]), np.gradient(d[1])  # d/d(axis0), d/d(axis1)
        det = (1 + g0[0]) * (1 + g1[1]) - g0[1] * g1[0]
    if det is None:
        return None
    det = np.asarray(det, dtype=np.float64).reshape(np.asarray(det).shape[-2:])
    return np.log(np.clip(det, 1e-3, None)), det <= 0


def _grid_lines(displacement: np.ndarray, step: int, x0: float, y0: float) -> list[np.ndarray]:
    """φ's grid: points p + d(p) along lines of constant x and of constant y, offset by (x0, y0).
    Display coordinates are (x, y) = (axis 0, axis 1), matching ``imshow(array.T, origin='lower')``."""
    d = np.asarray(displacement, dtype=np.float64)
    h, w = d.shape[1:]
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    px, py = ii + d[0] + x0, jj + d[1] + y0
    lines = [np.stack([px[i], py[i]], axis=1) for i in range(0, h, step)]
    lines += [np.stack([px[:, j], py[:, j]], axis=1) for j in range(0, w, step)]
    return lines


def _example_figure(example: "Example", rows: Sequence[tuple[str, "Example | None"]], path: Path) -> Path:
    """One mosaic image (rows = methods, columns = :data:`_PANEL_COLUMNS`) drawn in a single axes,
    with one horizontal colour bar per column; much faster than one axes per panel."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.collections import LineCollection
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    image = np.asarray(example.image, dtype=np.float32)
    mask = np.asarray(example.mask)
    brain = np.asarray(example.brain_mask)
    preds = [ex.prediction if ex is not None else {} for _, ex in rows]
    anomaly_q = _percentile([p["anomaly_map"] for p in preds if p.get("anomaly_map") is not None], brain)
    unc_q = _percentile([p["uncertainty"] for p in preds if p.get("uncertainty") is not None], brain)
    jac = [_log_jacobian(p) for p in preds]
    jac_q = _percentile([np.abs(j[0]) for j in jac if j is not None], brain)
    scales = [("gray", 0.0, 1.0), ("gray", 0.0, 1.0), ("gray", 0.0, 1.0),
              ("RdBu_r", -max(jac_q or 0.0, 0.05), max(jac_q or 0.0, 0.05)),
              ("viridis", 0.0, max(unc_q or 0.0, 1e-3)), ("inferno", 0.0, max(anomaly_q or 0.0, 1e-3)),
              ("gray", 0.0, 1.0)]
    has_colorbar = [True, True, True, any(j is not None for j in jac),
                    any(p.get("uncertainty") is not None for p in preds),
                    any(p.get("anomaly_map") is not None for p in preds), False]

    nx, ny = image.shape  # display: x = axis 0 (horizontal), y = axis 1 (vertical)
    n_rows, n_cols = len(rows), len(_PANEL_COLUMNS)
    gap = max(2, nx // 16)
    width, height = n_cols * (nx + gap) - gap, n_rows * (ny + gap) - gap
    canvas = np.ones((height, width, 4), dtype=np.float32)
    origin = [[(c * (nx + gap), (n_rows - 1 - r) * (ny + gap)) for c in range(n_cols)] for r in range(n_rows)]
    missing: list[tuple[int, int, str]] = []
    grids: list[tuple[list[np.ndarray], tuple[int, int]]] = []
    for r, ((_, ex), pred, jr) in enumerate(zip(rows, preds, jac)):
        columns = [image, pred.get("reconstruction"), pred.get("warped"), None if jr is None else jr[0],
                   pred.get("uncertainty"), pred.get("anomaly_map"), image]
        for c, array in enumerate(columns):
            x0, y0 = origin[r][c]
            block = canvas[y0:y0 + ny, x0:x0 + nx]
            if array is None:
                block[:] = (0.93, 0.93, 0.93, 1.0)
                missing.append((r, c, "n/a" if ex is not None else "no example"))
                continue
            cmap, vmin, vmax = scales[c]
            values = np.asarray(array, dtype=np.float32).reshape(image.shape).T
            block[:] = colormaps[cmap](Normalize(vmin, vmax, clip=True)(np.nan_to_num(values)))
            if c == 3:
                block[jr[1].T] = (0.0, 0.0, 0.0, 1.0)
                if pred.get("displacement") is not None:
                    grids.append((_grid_lines(pred["displacement"], max(2, max(nx, ny) // 12), x0, y0), (x0, y0)))

    scale = 1.3 / max(nx, ny)  # inches per pixel
    left, right, top, bottom = 0.3, 0.05, 0.62, 0.5
    fig_w, fig_h = left + width * scale + right, top + height * scale + bottom
    fig = plt.figure(figsize=(fig_w, fig_h))
    ax = fig.add_axes([left / fig_w, bottom / fig_h, width * scale / fig_w, height * scale / fig_h])
    extent = (-0.5, width - 0.5, -0.5, height - 0.5)
    ax.imshow(canvas, origin="lower", extent=extent, interpolation="nearest")
    ax.set_axis_off()
    for lines, (x0, y0) in grids:
        collection = LineCollection(lines, colors="k", linewidths=0.45, alpha=0.7)
        ax.add_collection(collection)
        collection.set_clip_path(Rectangle((x0 - 0.5, y0 - 0.5), nx, ny, transform=ax.transData))
    gx, gy = np.meshgrid(np.arange(nx), np.arange(ny))
    for r in range(n_rows):
        x0, y0 = origin[r][6]
        if brain.any():
            ax.contour(gx + x0, gy + y0, brain.T.astype(float), levels=[0.5], colors=["#4fa3ff"], linewidths=0.5)
        if mask.any():
            ax.contour(gx + x0, gy + y0, mask.T.astype(float), levels=[0.5], colors=["red"], linewidths=0.9)
        else:
            ax.text(x0 + nx / 2, y0 + 1, "no lesion", ha="center", va="bottom", color="white", fontsize=6)
    for r, c, text in missing:
        x0, y0 = origin[r][c]
        ax.text(x0 + nx / 2, y0 + ny / 2, text, ha="center", va="center", color="#888888", fontsize=8)
    for c, name in enumerate(_PANEL_COLUMNS):
        ax.text(origin[0][c][0] + nx / 2, height, name, ha="center", va="bottom", fontsize=7.5)
    for r, (name, _) in enumerate(rows):
        ax.text(-gap, origin[r][0][1] + ny / 2, name, rotation=90, ha="right", va="center", fontsize=7.5,
                fontweight="bold")
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    for c in range(n_cols):
        if not has_colorbar[c]:
            continue
        cmap, vmin, vmax = scales[c]
        cax = fig.add_axes([(left + origin[0][c][0] * scale + 0.06) / fig_w, (bottom - 0.2) / fig_h,
                            (nx * scale - 0.12) / fig_w, 0.07 / fig_h])
        bar = fig.colorbar(ScalarMappable(Normalize(vmin, vmax), colormaps[cmap]), cax=cax, orientation="horizontal")
        ticks = [vmin, (vmin + vmax) / 2, vmax]
        bar.set_ticks(ticks, labels=[f"{t:.2g}" for t in ticks])
        bar.ax.tick_params(labelsize=6, length=2, pad=1)
    fig.text(0.5, 1 - 0.08 / fig_h, f"{example.lesion_type} — {example.subject}, slice {example.slice_index}, "
             f"{int(np.count_nonzero(mask))} lesion pixels (anterior up)", ha="center", va="top", fontsize=8.5)
    return save_figure(fig, path, dpi=FIGURE_DPI)


def _example_sections(results: Sequence["MethodResult"], fig_dir: Path) -> list[str]:
    keys: list[tuple[str, int]] = []
    reference: dict[tuple[str, int], Any] = {}
    for r in results:
        for ex in r.examples or []:
            key = (str(ex.subject), int(ex.slice_index))
            if key not in reference:
                keys.append(key)
                reference[key] = ex
    if not keys:
        return ["<p class=\"note\">No example slices were recorded.</p>"]
    by_method = {r.name: {(str(ex.subject), int(ex.slice_index)): ex for ex in (r.examples or [])} for r in results}
    types: list[str] = []
    for key in keys:
        t = str(reference[key].lesion_type)
        if t not in types:
            types.append(t)
    types.sort(key=lambda t: (t == "healthy", 0))  # stable: healthy last, others in order of appearance
    parts = []
    n = 0
    for t in types:
        parts.append(f"<h3>{_e(t)}</h3>")
        for key in keys:
            ex = reference[key]
            if str(ex.lesion_type) != t:
                continue
            rows = [(r.name, by_method[r.name].get(key)) for r in results]
            name = f"example_{n:02d}_{_slug(t)}_{_slug(key[0])}_s{key[1]}.png"
            n += 1
            _example_figure(ex, rows, fig_dir / name)
            caption = (f"{t}: subject {key[0]}, slice {key[1]} "
                       f"({int(np.count_nonzero(np.asarray(ex.mask)))} lesion pixels).")
            parts.append(f'<figure><img src="figures/{_e(name)}" alt="{_e(caption)}">'
                         f"<figcaption>{_e(caption)}</figcaption></figure>")
    return parts


# ---------------------------------------------------------------------------------- report
def _context_table(context: Mapping[str, Any] | None) -> str:
    if not context:
        return ""
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in context.items())
    return f'<table class="context">{rows}</table>'


def _notes(results: Sequence["MethodResult"]) -> str:
    items = []
    for r in results:
        for note in r.metrics.get("notes") or []:
            items.append(f"<li><b>{_e(r.name)}</b>: {_e(note)}</li>")
        if r.metrics.get("mode"):
            items.append(f"<li><b>{_e(r.name)}</b>: metric mode {_e(r.metrics['mode'])}</li>")
    return f'<ul class="note">{"".join(items)}</ul>' if items else ""


def _size_caption(results: Sequence["MethodResult"]) -> str:
    for r in results:
        edges = r.metrics.get("size_edges")
        if edges is not None and len(edges) == 2 and all(_finite(e) is not None for e in edges):
            return (f"Lesion size tertiles by lesion pixels per slice: small ≤ {float(edges[0]):.0f} "
                    f"&lt; medium ≤ {float(edges[1]):.0f} &lt; large (edges from the test split).")
    return "Lesion size tertiles by lesion pixels per slice."


def write_report(results: Sequence["MethodResult"], out_dir: Path, title: str = "anomorph evaluation",
                 context: dict | None = None) -> Path:
    """Write ``out_dir/report.html`` (atomically) and its PNG figures under ``out_dir/figures/``.

    ``results`` are :class:`~anomorph.evaluation.evaluate.MethodResult` s (same example slices in
    each); ``context`` is shown as a key → value table under the title. Returns the HTML path.
    """

    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    results = list(results)

    body: list[str] = [f"<h1>{_e(title)}</h1>", _context_table(context)]
    if not results:
        body.append("<p>No results.</p>")
    else:
        body.append("<h2>Metrics — overall</h2>")
        body.append(
            '<p class="note">↑ higher is better, ↓ lower is better; <b>bold</b> = best non-oracle value '
            "per column (LPR, HRR, displacement and counts are not ranked). "
            "<b>DICE*</b> is an <b>oracle (best threshold on test)</b> and is not an honest score; "
            "Dice@val and Dice@5%FPR use thresholds chosen on val. "
            "The <b>oracle</b> row scores |x − healthy| with the true healthy image: the limit of any "
            "reconstruction method on this data. "
            f"{DASH} = undefined or not applicable (hover for the reason).</p>")
        body.append(_overall_table(results))
        body.append(_notes(results))
        by_type = _grouped_table(results, "by_lesion_type")
        body.append("<h2>Metrics — per lesion type</h2>")
        body.append('<p class="note">Each group: the abnormal slices of that lesion type plus all healthy '
                    "slices.</p>")
        body.append(by_type or "<p>No lesion-type breakdown.</p>")
        by_size = _grouped_table(results, "by_size", SIZE_BINS)
        body.append("<h2>Metrics — per lesion size tertile</h2>")
        body.append(f'<p class="note">{_size_caption(results)} Each group also contains all healthy slices.</p>')
        body.append(by_size or "<p>No size breakdown.</p>")

        body.append("<h2>ROC and precision–recall curves</h2>")
        curves = []
        for kind, caption in (("roc", "Pixel ROC, all methods."), ("pr", "Pixel precision–recall, all methods.")):
            path = _curve_figure(results, kind, fig_dir / f"{kind}.png")
            if path is not None:
                path
                curves.append(f'<figure style="display:inline-block;margin-right:1em">'
                              f'<img src="figures/{kind}.png" alt="{_e(caption)}">'
                              f"<figcaption>{_e(caption)}</figcaption></figure>")
        body.append("".join(curves) or "<p>No curves (no anomalous or no healthy test pixels).</p>")

        body.append("<h2>Examples</h2>")
        body.append(
            '<p class="note">One row per method. Columns: input x; pseudo-healthy reconstruction x̂; '
            "warped x̃ = x̂ ∘ φ; log det Jφ (red = expansion, blue = contraction, black = folded, "
            "det ≤ 0) with φ's warped grid overlaid; uncertainty u; anomaly map; ground-truth mask "
            "(red) and brain mask (blue) contours on x. Each column shares one colour scale across "
            "methods (colour bar below it): images on [0, 1], anomaly map and uncertainty on [0, q] with q "
            "the 99th percentile inside the brain over all methods for that slice, log det Jφ symmetric. "
            "n/a = not produced by that method. Anterior is up.</p>")
        body.extend(_example_sections(results, fig_dir))

    links = [f'<a href="{n}">{n}</a>' for n in ("metrics.json", "metrics.csv") if (out_dir / n).exists()]
    footer = (f'<hr><p class="note">Generated {_e(_dt.datetime.now().isoformat(timespec="seconds"))} by '
              f"anomorph.{' Raw metrics: ' + ', '.join(links) + '.' if links else ''}</p>")
    document = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
                f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
                + "\n".join(p for p in body if p) + "\n" + footer + "\n</body>\n</html>\n")
    return atomic_write(out_dir / "report.html",
                                  lambda tmp: Path(tmp).write_text(document, encoding="utf-8"))
