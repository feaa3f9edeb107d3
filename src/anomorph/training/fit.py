"""``anomorph fit``: train one configured model into a self-describing run directory.

Run directory layout::

    RUN_DIR/config.yaml            resolved config (every default filled in)
    RUN_DIR/checkpoints/last.ckpt  latest state (resume from here)
    RUN_DIR/checkpoints/best.ckpt  lowest val/loss on healthy val slices
    RUN_DIR/logs/csv/sessionN/metrics.csv   CSV log of the N-th (re)start (read all: read_training_log)
    RUN_DIR/logs/tensorboard/sessionN/      TensorBoard events
    RUN_DIR/figures/val_epochNNN.png  reconstructions per validation epoch
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from ..errors import CheckpointError
from ..config import ConfigError, RunConfig, config_from_dict, config_to_dict, load_config, save_config
from .datamodule import SliceDataModule
from .module import AnomalyModule, network_options




def _quiet_lightning() -> None:
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                 "lightning.fabric.utilities.seed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
    warnings.filterwarnings("ignore", message=r".*number of training batches .* is smaller than the logging.*")


def fit(config: RunConfig, run_dir: str | Path | None = None, resume: bool = False,
        devices: Any = None, strategy: str | None = None, accelerator: str | None = None) -> Path:
    """Train ``config``; return the run directory.

    ``run_dir`` defaults to ``<output_dir>/<name>``. An existing run directory with checkpoints
    is only reused with ``resume=True`` (then training continues from ``last.ckpt``, loaded
    with ``weights_only=True``, and the saved config is used). ``devices`` / ``strategy`` /
    ``accelerator`` override the config's Trainer settings (e.g. ``strategy="ddp", devices=2``).
    """
    _quiet_lightning()
    run_dir = Path(run_dir) if run_dir is not None else Path(config.output_dir) / config.name
    last = run_dir / "checkpoints" / "last.ckpt"
    if resume:
        if not last.is_file():
            raise CheckpointError(f"cannot resume: {last} not found")
        config = load_config(run_dir / "config.yaml")
    elif last.exists():
        raise ConfigError(f"run directory {run_dir} already holds checkpoints; pass --resume to continue it "
                          f"or choose another --run-dir / name")
    t = config.train
    L.seed_everything(config.seed, workers=True, verbose=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    datamodule = SliceDataModule(config.data, seed=config.seed)
    module = AnomalyModule(config_to_dict(config))
    module.figure_dir = run_dir / "figures"
    module.figure_dir.mkdir(exist_ok=True)
    # each (re)start logs into its own folder: Lightning's CSVLogger would delete an existing metrics.csv
    session = f"session{len(list((run_dir / 'logs' / 'csv').glob('session*')))}"
    checkpoints = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor="val/loss",
                                  mode="min", save_top_k=1, save_last=True, enable_version_counter=False)
    callbacks: list = [checkpoints]
    if t.early_stopping_patience > 0:
        callbacks.append(EarlyStopping(monitor="val/loss", mode="min", patience=t.early_stopping_patience))
    if t.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=1))
    trainer = L.Trainer(
        default_root_dir=run_dir,
        max_epochs=t.max_epochs,
        max_steps=t.max_steps,
        accelerator=accelerator or t.accelerator,
        devices=devices if devices is not None else t.devices,
        strategy=strategy or t.strategy,
        precision=t.precision,
        callbacks=callbacks,
        logger=[CSVLogger(run_dir / "logs", name="csv", version=session),
                TensorBoardLogger(run_dir / "logs", name="tensorboard", version=session)],
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        limit_train_batches=t.limit_train_batches,
        log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        deterministic="warn",
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if resume else None, weights_only=True)
    return run_dir


def read_training_log(run_dir: str | Path) -> list[dict[str, str]]:
    """All rows of a run's CSV training logs, oldest session first (a resumed run has several)."""
    import csv

    rows: list[dict[str, str]] = []
    sessions = sorted((Path(run_dir) / "logs" / "csv").glob("session*"), key=lambda p: int(p.name[7:]))
    for session in sessions:
        path = session / "metrics.csv"
        if path.is_file():
            with path.open(newline="") as handle:
                rows.extend(csv.DictReader(handle))
    return rows


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for code payloads, RuntimeError for corrupt zips
        raise CheckpointError(f"{path}: refused or unreadable checkpoint ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from err


def load_run(run_dir: str | Path, which: str = "best") -> tuple[torch.nn.Module, RunConfig]:
    """Load a trained network (eval mode, CPU) and its config from a run directory.

    ``which`` is "best" or "last" (falls back to "last" when no best checkpoint exists).
    """
    run_dir = Path(run_dir)
    path = run_dir / "checkpoints" / f"{which}.ckpt"
    if not path.is_file() and which == "best":
        path = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = load_checkpoint(path)
    try:
        config_dict = checkpoint["hyper_parameters"]["config"]
        state = checkpoint["state_dict"]
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: not an anomorph checkpoint (no hyper_parameters.config/state_dict)") from err
    config = config_from_dict(config_dict)
    from ..networks import build_network

    network = build_network(network_options(config))
    prefix = "network."
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        network.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not match the {config.model.name!r} network of its config: "
                              f"{str(err).splitlines()[0]} ...") from err
    network.eval()
    return network, config
