"""Uncertainty-guided regularisation of the deformation field (SPEC §3, the novelty).

Strategies: ``gating`` (v' = (1 − m)·v), ``conditioned`` (the head reads m and was trained
with a spatially weighted prior), ``map`` (per-image test-time MAP refinement of v) and
``iterative`` (register, re-estimate, register again). ``m`` is a soft mask in [0, 1]:
1 = "hold the deformation stiff here".
"""
from .masks import dilate_mask, paste_intensity, ramp_mask, synthetic_anomaly_masks
from .priors import log_jacobian_anchor

__all__ = ["dilate_mask", "paste_intensity", "ramp_mask", "synthetic_anomaly_masks", "log_jacobian_anchor"]
