"""Where the time of one test-time-optimisation predict goes (issue 15; cost masking by default).

Loads a trained deformable run read-only (nothing is written into it: the healthy normaliser is
fitted in memory on the calibration subjects of ``--manifest``, as the benchmark does), takes the
slices of one test volume of that manifest on the run's grid, and times, for the guided detector
with the given guidance values:

- ``signal``: the uncertainty estimator's pass and the mask (``GuidedScorer.guidance_mask``);
- ``network``: the network pass the optimisation starts from (before: ``scorer.network(images)``;
  after: ``GuidedScorer.plain_start``, the estimator's own plain pass when it ran one, e.g.
  ``warped_residual``);
- the Adam loop, per step: ``integrate`` (scaling and squaring of v), ``warp`` (x̂ ∘ φ),
  ``similarity`` (masked LNCC), ``smoothness`` (‖∇v‖²), ``backward`` and ``adam`` (the update);
- ``final``: the objective at the last v (gives the returned x̃ and φ);
- ``call``: the whole detector call, and the unguided detector's call on the same slices.

The loop is re-implemented here with timers around each part of
:meth:`anomorph.scoring.strategies.TestTimeRegistration.objective`, twice per round: **before**
(every window moment of the masked LNCC filtered at every step by MONAI's ``separable_filtering``
in the NCHW layout, MONAI's ``Warp.forward`` and ``DVF2DDF.forward``: the computation until
issue 15) and **after** (the
moments of (x, 1 − m), which do not depend on v, filtered once:
:class:`anomorph.losses.FixedWindowMoments`; window sums filtered channels-last, zero-padded by
the convolutions;
:meth:`anomorph.networks.deformation.PixelWarp.forward`, the same grid arithmetic without the
in-place slice writes and advanced indexing; the integrator's compositions in ``grid_sample``'s
own frame, and the Adam steps' warp there too (``MorphAEus.warp_by_velocity``); the start pass
reused from the estimator; all as the code does now). Both results are
checked against the detector's own output (max |Δ anomaly map|, printed). Nothing here is a test.

Usage::

    .venv/bin/python benchmarks/profile_tto.py RUN_DIR --manifest MANIFEST \\
        --guidance strategy=cost_masking threshold=6 softness=1 map_lambda=0.1 --estimator warped_residual \\
        --json benchmarks/results/speed/tto_profile.json
"""
from __future__ import annotations

import anomorph  # noqa: F401,I001 - first: the threading setup before torch loads (anomorph.runtime)

import argparse
import contextlib
import datetime as _dt
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from anomorph.data.io import write_json

PARTS = ("integrate", "warp", "similarity", "smoothness", "backward", "adam")  # per Adam step


def _now() -> float:
    return time.perf_counter()


@contextlib.contextmanager
def _code_before(before: bool):
    """``before``: warp with MONAI's ``Warp.forward``, integrate with MONAI's ``DVF2DDF.forward``
    and filter the window sums with MONAI's ``separable_filtering`` (NCHW, padded copies) and
    the SSIM taps NCHW, as until issue 15, instead of
    :meth:`anomorph.networks.deformation.PixelWarp.forward`,
    :meth:`anomorph.networks.deformation.VelocityIntegrator.forward`,
    :func:`anomorph.losses._window_sums` and :func:`anomorph.losses._depthwise_layout` (same
    values up to rounding, fewer and faster ops)."""
    from monai.networks.blocks import DVF2DDF, Warp
    from monai.networks.layers import separable_filtering

    from anomorph import losses
    from anomorph.networks.deformation import PixelWarp, VelocityIntegrator

    def monai_window_sums(stacked: torch.Tensor, kernel_size: int) -> torch.Tensor:
        kernel = torch.ones(kernel_size, dtype=stacked.dtype, device=stacked.device)
        return separable_filtering(stacked, [kernel] * (stacked.ndim - 2))

    saved = PixelWarp.forward, VelocityIntegrator.forward, losses._window_sums, losses._depthwise_layout
    if before:
        PixelWarp.forward, VelocityIntegrator.forward = Warp.forward, DVF2DDF.forward
        losses._window_sums, losses._depthwise_layout = monai_window_sums, (lambda stacked: stacked)
    try:
        yield
    finally:
        PixelWarp.forward, VelocityIntegrator.forward, losses._window_sums, losses._depthwise_layout = saved


def profile_loop(scorer, images: torch.Tensor, start, m: torch.Tensor, reuse: bool) -> tuple[dict[str, float], Any]:
    """One Adam loop of ``scorer.strategy_impl`` with per-part wall seconds (summed over steps).
    ``reuse``: the code as it is now (the window moments of (x, 1 − m) filtered once,
    :class:`FixedWindowMoments`; anomorph's warp, integrator and filter layout; the Adam steps
    integrate and warp in ``grid_sample``'s frame unless the anchor term needs the displacement
    in pixels, as :meth:`TestTimeRegistration.objective` with ``with_output=False``); False: as before
    issue 15 (every moment filtered at every step; MONAI's ``Warp.forward`` and ``DVF2DDF.forward``,
    NCHW filtering: :func:`_code_before`)."""
    from anomorph import losses
    from anomorph.networks import ModelOutput

    impl, g, window = scorer.strategy_impl, scorer.guidance, scorer.config.train.ncc_window
    net = scorer.network
    seconds = dict.fromkeys(PARTS, 0.0)
    prior = start.reconstruction.detach()
    velocity = start.velocity.detach().clone().requires_grad_(True)
    optimiser = torch.optim.Adam([velocity], lr=g.map_lr)
    t0 = _now()
    fixed = losses.FixedWindowMoments(images, 1.0 - m, window) if reuse and impl.mask_similarity else None
    seconds["fixed_moments"] = _now() - t0

    def objective(v: torch.Tensor, timed: bool) -> tuple[torch.Tensor, Any]:
        # the Adam steps of the code as it is now, without the anchor term, integrate and warp
        # in grid_sample's frame (MorphAEus.warp_by_velocity, split here into its two parts)
        fused = reuse and timed and not impl.anchor
        t0 = _now()
        field = net.integrator.normalised_field(v) if fused else None
        displacement = net.integrate(v) if field is None else None
        t1 = _now()
        warped = net.warp(prior, displacement) if field is None else net.warper.warp_normalised(prior, field)
        t2 = _now()
        if impl.mask_similarity:
            similarity = losses.masked_local_ncc_loss(warped, images, 1.0 - m, kernel_size=window, fixed=fixed)
        else:
            similarity = losses.local_ncc_loss(warped, images, kernel_size=window)
        t3 = _now()
        total = similarity + g.map_lambda * losses.velocity_smoothness(v)
        if impl.anchor:
            total = total + g.map_anchor * (m * displacement.pow(2).sum(1, keepdim=True)).mean()
        t4 = _now()
        if timed:
            for name, value in zip(PARTS[:4], (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                seconds[name] += value
        return total, ModelOutput(prior, warped, v, displacement)

    with torch.enable_grad(), _code_before(not reuse):
        for _ in range(g.map_steps):
            total, _ = objective(velocity, True)
            optimiser.zero_grad()
            t0 = _now()
            total.backward()
            t1 = _now()
            optimiser.step()
            seconds["backward"] += t1 - t0
            seconds["adam"] += _now() - t1
    t0 = _now()
    with torch.no_grad(), _code_before(not reuse):
        _, out = objective(velocity.detach(), False)
    seconds["final"] = _now() - t0
    return seconds, out


def test_volume(manifest: Path, slices_config) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(images, brain masks, subject) of the first test subject with a lesion, on the model grid."""
    from anomorph.data.slices import SliceDataset

    test = SliceDataset(manifest, ["test"], slices_config)
    subjects = [row.subject for row, _, _ in test.meta]
    lesion = [row.subject for row, _, label in test.meta if label]
    subject = lesion[0] if lesion else subjects[0]
    index = [i for i, s in enumerate(subjects) if s == subject]
    return test.images[index], test.brain_masks[index], subject


def run(args: argparse.Namespace) -> dict[str, Any]:
    from anomorph.data.slices import SliceConfig
    from anomorph.evaluation.evaluate import EvaluationData
    from anomorph.runs import load_run
    from anomorph.scoring import Detector

    _, config = load_run(args.run)
    slices = SliceConfig.from_config(config.data)
    data = EvaluationData.load(args.manifest, slices, args.calibration_fraction)
    healthy = data.healthy_reference()
    guidance = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.guidance)}
    detector = Detector.from_run(args.run, guidance=guidance, estimator=args.estimator, healthy=healthy,
                                 calibration=False)
    plain = Detector.from_run(args.run, guidance="none", calibration=False)
    scorer = detector.scorer
    images, brains, subject = test_volume(args.manifest, slices)
    torch.manual_seed(0)

    rows: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    calls: list[dict[str, float]] = []
    max_diff: dict[str, float] = {}
    brain_diff: dict[str, dict[str, float]] = {}  # |Δ anomaly| over brain pixels, last round
    for repeat in range(args.repeats + 1):  # the first round is warm-up
        with torch.no_grad():
            t0 = _now()
            plain(images, brains)
            t1 = _now()
            reference = detector(images, brains)
            t2 = _now()
        with torch.no_grad():
            t3 = _now()
            m, _ = scorer.guidance_mask(images, brains, None)
            t4 = _now()
            starts = {"after": scorer.plain_start(images)}  # the estimator's pass when it ran one
            t5 = _now()
            starts["before"] = scorer.network(images)      # a pass of its own, as before
            t6 = _now()
        network_s = {"after": t5 - t4, "before": t6 - t5}
        for variant, reuse in (("before", False), ("after", True)):
            parts, out = profile_loop(scorer, images, starts[variant], m, reuse)
            anomaly = (images - out.warped).abs() * brains
            difference = (anomaly - reference.anomaly_map).abs()
            max_diff[variant] = max(max_diff.get(variant, 0.0), float(difference.max()))
            inside = difference[brains.bool()].double()
            brain_diff[variant] = {"max": float(inside.max()), "q999": float(inside.quantile(0.999)),
                                   "mean": float(inside.mean())}
            if repeat:
                rows[variant].append({"signal": t4 - t3, "network": network_s[variant], **parts})
        if repeat:
            calls.append({"unguided_call": t1 - t0, "guided_call": t2 - t1})
    call = {k: statistics.median(c[k] for c in calls) for k in calls[0]}
    g = scorer.guidance
    variants = {}
    for variant, samples in rows.items():
        median = {k: statistics.median(r[k] for r in samples) for k in samples[0]}
        total = sum(median.values())
        variants[variant] = {"seconds": median, "seconds_total": total,
                             "fraction": {k: v / total for k, v in median.items()},
                             "per_step_ms": {k: 1000 * median[k] / g.map_steps for k in PARTS},
                             "max_abs_difference_vs_detector": max_diff[variant],
                             "brain_abs_difference_vs_detector": brain_diff[variant]}
    return {
        "schema": "anomorph.profile_tto/1",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python", "benchmarks/profile_tto.py", *sys.argv[1:]]),
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                        "load_average": [round(v, 2) for v in os.getloadavg()]},
        "run": str(args.run), "subject": subject, "slices": int(images.shape[0]),
        "grid": list(images.shape[2:]), "strategy": g.strategy, "estimator": detector.estimator_model.name,
        "map_steps": g.map_steps, "repeats": args.repeats,
        "variants": variants,
        "calls": call, "guided_vs_unguided_call": call["guided_call"] / call["unguided_call"],
    }


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{result['strategy']} ({result['estimator']}, {result['map_steps']} steps), {result['slices']} slices of "
             f"{result['subject']} on the {'×'.join(map(str, result['grid']))} grid; median of {result['repeats']} "
             f"after a warm-up; torch {result['environment']['torch']}, {result['environment']['threads']} threads, "
             f"load {result['environment']['load_average']}", "",
             "| part | before: s per call | share | ms per step | after: s per call | share | ms per step |",
             "|---|---|---|---|---|---|---|"]
    before, after = result["variants"]["before"], result["variants"]["after"]
    for name in after["seconds"]:
        cells = []
        for v in (before, after):
            step = v["per_step_ms"].get(name)
            cells.append(f"{v['seconds'].get(name, 0.0):.3f} | {100 * v['fraction'].get(name, 0.0):.1f} % | "
                         f"{'—' if step is None else f'{step:.1f}'}")
        lines.append(f"| {name} | {' | '.join(cells)} |")
    lines.append(f"| total | {before['seconds_total']:.3f} | | | {after['seconds_total']:.3f} | | |")
    calls = result["calls"]
    lines += ["", f"detector call (after): guided {calls['guided_call']:.3f} s, unguided {calls['unguided_call']:.3f} s "
              f"({result['guided_vs_unguided_call']:.2f}x). Loop re-implemented here vs the detector's output, max "
              f"|Δ anomaly|: before {before['max_abs_difference_vs_detector']:.1e}, after "
              f"{after['max_abs_difference_vs_detector']:.1e}"]
    inside = before.get("brain_abs_difference_vs_detector")
    if inside:
        lines[-1] += (f"; before, over the brain's pixels: 99.9th percentile {inside['q999']:.1e}, mean "
                      f"{inside['mean']:.1e}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, metavar="RUN_DIR")
    parser.add_argument("--manifest", type=Path, required=True, help="the run's data (calibration + a test volume)")
    parser.add_argument("--guidance", nargs="+", default=["strategy=cost_masking"], metavar="KEY=VALUE",
                        help="GuidanceConfig values (default: strategy=cost_masking)")
    parser.add_argument("--estimator", default=None, help="u estimator (default: the run's guidance.estimator)")
    parser.add_argument("--calibration-fraction", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, metavar="PATH")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(format_table(result))
    if args.json is not None:
        print(f"wrote {write_json(args.json, result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
