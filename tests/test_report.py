"""report.html: offline, escaped, every figure present, undefined metrics explained, best in bold."""
from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomorph.evaluation.evaluate import Example, MethodResult
from anomorph.evaluation.metrics import UndefinedMetric
from anomorph.reporting.report import write_report

SIZE = 48
LESION_TYPES = ("tumour", "ms<lesion>")  # '<' '>' exercise escaping


def _slices(rng: np.random.Generator) -> list[tuple[str, str, int, np.ndarray, np.ndarray, np.ndarray]]:
    x, y = np.meshgrid(np.linspace(-1, 1, SIZE), np.linspace(-1, 1, SIZE), indexing="ij")
    brain = ((x / 0.8) ** 2 + (y / 0.9) ** 2 < 1).astype(np.float32)
    out = []
    for t, lesion_type in enumerate(LESION_TYPES + ("healthy",)):
        for k in range(2 if lesion_type != "healthy" else 1):
            image = (brain * (0.5 + 0.2 * np.cos(3 * x) + 0.05 * rng.standard_normal(x.shape))).clip(0, 1)
            mask = np.zeros_like(image)
            if lesion_type != "healthy":
                cx, cy = 14 + 10 * k, 20 + 4 * t
                mask[cx - 4:cx + 4, cy - 3:cy + 3] = 1
                image = np.where(mask > 0, 0.95, image)
            out.append((f"sub{t}{k}", lesion_type, 10 + k, image.astype(np.float32), mask, brain))
    return out


def _metrics(rng: np.random.Generator, auroc: float, deformable: bool, uncertainty: bool) -> dict:
    def block(scale: float) -> dict:
        m = {"n_slices": 10, "n_abnormal_slices": 4, "n_pixels": 1000, "n_anomalous_pixels": 50,
             "pixel_auroc": auroc * scale, "pixel_auprc": 0.5 * auroc * scale,
             "dice_at_val": UndefinedMetric("no abnormal val slices to tune the threshold on"),
             "dice_at_fpr": 0.3 * auroc, "oracle_best_dice": 0.4 * auroc, "slice_auroc": 0.7 + 0.1 * rng.random(),
             "slice_auprc": 0.6 + 0.1 * rng.random(), "slice_fpr_at_95_tpr": 1.0 - auroc}
        if deformable:
            m.update(lpr=0.8, hrr=0.3, folding_fraction=0.001 * (1.0 - auroc), mean_displacement_lesion=0.5,
                     mean_displacement_healthy=UndefinedMetric("no healthy brain pixels"))
        if uncertainty:
            m.update(uncertainty_auroc=0.75, uncertainty_auprc=0.2)
        m["undefined"] = {k: v.reason for k, v in m.items() if isinstance(v, UndefinedMetric)}
        return m

    metrics = block(1.0)
    metrics["by_lesion_type"] = {t: block(0.99) for t in LESION_TYPES}
    metrics["by_size"] = {s: block(0.98) for s in ("small", "medium", "large")}
    metrics["size_edges"] = (30.0, 50.0)
    metrics["notes"] = ["2 slices with an empty brain mask are excluded from slice metrics"]
    return metrics


def _curves(auroc: float) -> dict:
    fpr = np.linspace(0, 1, 50)
    tpr = fpr ** (1 - auroc)
    return {"roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
            "pr": {"recall": tpr[::-1].tolist(), "precision": np.linspace(0.05, 1, 50).tolist()}}


def make_results(seed: int = 0) -> list[MethodResult]:
    """ae (plain), morphaeus (displacement + jacobian), guided (displacement only + uncertainty),
    oracle (best everywhere but must not be bold)."""
    rng = np.random.default_rng(seed)
    slices = _slices(rng)
    plan = [("ae", 0.80, False, False), ("morphaeus<b>", 0.90, True, False), ("guided & co", 0.85, True, True),
            ("oracle", 0.99, False, False)]
    results = []
    for name, auroc, deformable, uncertainty in plan:
        examples = []
        for subject, lesion_type, index, image, mask, brain in slices:
            recon = (image * (1 - mask) + 0.5 * mask * brain + 0.02 * rng.standard_normal(image.shape)).clip(0, 1)
            disp = jac = None
            if deformable:
                yy = np.linspace(0, np.pi, SIZE)
                disp = np.stack([1.5 * np.sin(yy)[None, :].repeat(SIZE, 0),
                                 1.0 * np.cos(yy)[:, None].repeat(SIZE, 1)]).astype(np.float32)
                if name.startswith("morph"):
                    jac = (1 + 0.3 * rng.standard_normal(image.shape)).astype(np.float32)
            unc = (rng.random(image.shape) * brain).astype(np.float32) if uncertainty else None
            anomaly = (np.abs(image - recon) * brain).astype(np.float32)
            examples.append(Example(subject, lesion_type, index, image, mask, brain,
                                    {"anomaly_map": anomaly, "reconstruction": recon.astype(np.float32),
                                     "warped": recon.astype(np.float32), "displacement": disp,
                                     "jacobian": jac, "uncertainty": unc}))
        results.append(MethodResult(name, deformable, _metrics(rng, auroc, deformable, uncertainty),
                                    _curves(auroc), examples))
    return results


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, str, float]:
    out = tmp_path_factory.mktemp("report")
    start = time.perf_counter()
    path = write_report(make_results(), out, title="Test <report> & co",
                        context={"manifest": "data/m.csv", "command": "anomorph evaluate --x '<y>'"})
    return path, path.read_text(encoding="utf-8"), time.perf_counter() - start


def test_report_written_with_valid_figures(report):
    path, text, elapsed = report
    assert path.name == "report.html" and path.exists()
    sources = re.findall(r'<img[^>]*\bsrc="([^"]+)"', text)
    assert any("roc" in s for s in sources) and any("pr.png" in s for s in sources)
    assert len(sources) == 2 + 5  # curves + 5 example slices
    for src in sources:
        assert not src.startswith("/") and "://" not in src  # relative
        png = path.parent / src
        assert png.exists(), src
        with Image.open(png) as image:
            assert image.format == "PNG"
            width, height = image.size
            assert 150 < width < 3000 and 150 < height < 3000
    assert not list(path.parent.glob("**/.tmp-*"))  # atomic writes left nothing behind


def test_report_contents_escaped_and_offline(report):
    _, text, _ = report
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text.lower() and "<link" not in text.lower()
    assert "Test &lt;report&gt; &amp; co" in text
    assert "morphaeus&lt;b&gt;" in text and "guided &amp; co" in text and ">ae<" in text
    assert "ms&lt;lesion&gt;" in text and "tumour" in text and "healthy" in text
    assert "morphaeus<b>" not in text and "ms<lesion>" not in text
    assert "&lt;y&gt;" in text and "data/m.csv" in text
    for size in ("small", "medium", "large"):
        assert f">{size}<" in text


def test_undefined_metrics_show_dash_with_reason(report):
    _, text, _ = report
    assert re.search(r'<td class="undef" title="no abnormal val slices to tune the threshold on">—</td>', text)
    assert 'title="no healthy brain pixels">—</td>' in text
    # LPR etc. are not applicable to non-deformable methods
    assert re.search(r'title="not applicable to ae">—</td>', text)


def test_oracle_labelled_and_best_bold(report):
    _, text, _ = report
    assert "oracle (best threshold on test)" in text
    assert "limit of any reconstruction method" in text
    assert re.search(r'<tr class="oracle"><td class="name" title="[^"]*limit of any reconstruction', text)
    overall = text.split("Metrics — per lesion type")[0]
    # best non-oracle AUROC is morphaeus (0.900); oracle (0.990) is not bold
    assert "<b>0.900</b>" in overall
    assert "<b>0.990</b>" not in overall and ">0.990<" in overall
    # FPR@95TPR: lower is better -> morphaeus 0.100 bold (oracle's 0.010 is not)
    assert "<b>0.100</b>" in overall and "<b>0.010</b>" not in overall
    # LPR/HRR never bold
    assert "<b>0.800</b>" not in text and "<b>0.300</b>" not in text


def test_report_without_examples_or_curves(tmp_path):
    results = make_results()
    for r in results:
        r.examples, r.curves = [], {}
    path = write_report(results, tmp_path)
    text = path.read_text()
    assert "No example slices" in text and "No curves" in text
    assert not re.findall(r"<img", text)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="/usr/bin/chromium not installed")
def test_report_renders_in_headless_chromium(report, tmp_path):
    path, _, _ = report
    shot = tmp_path / "shot.png"
    subprocess.run([shutil.which("chromium") or "/usr/bin/chromium", "--headless", "--no-sandbox",
                    "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                    f"--screenshot={shot}", "--window-size=1280,2000", path.resolve().as_uri()],
                   check=True, timeout=120, capture_output=True)
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("L"))
    assert pixels.shape[0] >= 1000 and pixels.std() > 5  # not a blank page


def test_report_with_no_results(tmp_path):
    path = write_report([], tmp_path, context={"note": "nothing evaluated"})
    assert "No results." in path.read_text() and "nothing evaluated" in path.read_text()
