"""Per-pixel uncertainty u(x) ∈ [0, 1] "that tissue is normal" (SPEC §3); see docs/uncertainty.md.

``build_estimator(name, **options)(network, images, brain_masks)`` → :class:`UncertaintyOutput`;
wrap any estimator in :class:`HealthyNormaliser` (fitted on healthy val slices) to z-score it;
``build_estimator("max(warped_residual,noncorrespondence)")`` combines normalised estimators.
"""
from anomorph.uncertainty.base import (
    UncertaintyEstimator,
    UncertaintyOutput,
    eval_mode,
    gradient_magnitude,
    sample_moments,
    squash_exponential,
)
from anomorph.uncertainty.combined import (
    CombinedEstimator,
    canonical_estimator_name,
    estimator_parts,
    parse_combination,
)
from anomorph.uncertainty.estimators import (
    ESTIMATORS,
    TARGETS,
    AleatoricEstimator,
    Augmentation,
    EnsembleEstimator,
    MCDropoutEstimator,
    RegistrationEstimator,
    ResidualZEstimator,
    SeededDropout,
    TTAEstimator,
    build_estimator,
    estimator_options,
)
from anomorph.uncertainty.metrics import (
    edge_area_fraction,
    edge_mask,
    edge_mass_fraction,
    edge_mass_terms,
    relative_cost,
)
from anomorph.uncertainty.normalise import HealthyNormaliser

__all__ = [
    "ESTIMATORS",
    "TARGETS",
    "AleatoricEstimator",
    "CombinedEstimator",
    "Augmentation",
    "EnsembleEstimator",
    "HealthyNormaliser",
    "MCDropoutEstimator",
    "RegistrationEstimator",
    "ResidualZEstimator",
    "SeededDropout",
    "TTAEstimator",
    "UncertaintyEstimator",
    "UncertaintyOutput",
    "build_estimator",
    "canonical_estimator_name",
    "edge_area_fraction",
    "edge_mask",
    "edge_mass_fraction",
    "edge_mass_terms",
    "estimator_options",
    "estimator_parts",
    "eval_mode",
    "gradient_magnitude",
    "parse_combination",
    "relative_cost",
    "sample_moments",
    "squash_exponential",
]
