"""Training: Lightning wrappers, data module and the ``fit`` entry point.

The losses moved to :mod:`anomorph.losses` (below scoring, which needs them without Lightning);
``anomorph.training.losses`` stays importable as an alias of it.
"""
import sys as _sys

from .. import losses

_sys.modules[__name__ + ".losses"] = losses
from .fit import (
    CheckpointError,
    ensemble_members,
    fit,
    fit_ensemble,
    is_ensemble,
    load_checkpoint,
    load_ensemble,
    load_run,
    read_training_log,
    resolve_run_dir,
)

__all__ = ["CheckpointError", "ensemble_members", "fit", "fit_ensemble", "is_ensemble", "load_checkpoint",
           "load_ensemble", "load_run", "read_training_log", "resolve_run_dir"]
