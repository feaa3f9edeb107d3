"""Training: Lightning wrappers, data module, losses and the ``fit`` entry point."""
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
