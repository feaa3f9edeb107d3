"""Training: Lightning wrappers, data module, losses and the ``fit`` entry point."""
from .fit import CheckpointError, fit, load_checkpoint, load_run, read_training_log

__all__ = ["CheckpointError", "fit", "load_checkpoint", "load_run", "read_training_log"]
