"""``anomorph fit``: train one configured model into a self-describing run directory.

Run directory layout::

    RUN_DIR/config.yaml            resolved config (every default filled in)
    RUN_DIR/checkpoints/last.ckpt  latest state (resume from here)
    RUN_DIR/checkpoints/best.ckpt  lowest val/loss on healthy val slices
    RUN_DIR/logs/csv/sessionN/metrics.csv   CSV log of the N-th (re)start (read all: read_training_log)
    RUN_DIR/logs/tensorboard/sessionN/      TensorBoard events
    RUN_DIR/figures/val_epochNNN.png  reconstructions per validation epoch

A deep ensemble (``anomorph fit --ensemble K``, :func:`fit_ensemble`) is a directory of K such
run directories with seeds ``seed + k``, plus ``ensemble.yaml`` listing them::

    RUN_DIR/ensemble.yaml          name, base seed, members (relative paths) and their seeds
    RUN_DIR/member0 ... memberK-1  ordinary run directories
"""
from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

import yaml

from ..errors import CheckpointError
from ..runtime import configure_threads
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
        devices: Any = None, strategy: str | None = None, accelerator: str | None = None,
        callbacks: Sequence[Any] = ()) -> Path:
    """Train ``config``; return the run directory.

    ``run_dir`` defaults to ``<output_dir>/<name>``. An existing run directory with checkpoints
    is only reused with ``resume=True`` (then training continues from ``last.ckpt``, loaded
    with ``weights_only=True``, and the saved config is used). ``devices`` / ``strategy`` /
    ``accelerator`` override the config's Trainer settings (e.g. ``strategy="ddp", devices=2``).
    ``callbacks``: extra Lightning callbacks (e.g. timers, as ``benchmarks/end_to_end.py`` uses).
    """
    configure_threads()
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
    callbacks = [checkpoints, *callbacks]
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


ENSEMBLE_FILE = "ensemble.yaml"


def is_ensemble(run_dir: str | Path) -> bool:
    """True when ``run_dir`` is an ensemble directory (holds ``ensemble.yaml``)."""
    return (Path(run_dir) / ENSEMBLE_FILE).is_file()


def ensemble_members(run_dir: str | Path) -> list[Path]:
    """The member run directories listed in ``RUN_DIR/ensemble.yaml``, in order."""
    path = Path(run_dir) / ENSEMBLE_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not an ensemble run directory (no {ENSEMBLE_FILE}); "
                          f"train one with `anomorph fit --ensemble K`")
    try:
        data = yaml.safe_load(path.read_text()) or {}
        members = [Path(run_dir) / str(m) for m in data["members"]]
    except (yaml.YAMLError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: unreadable ensemble file ({err})") from err
    if not members:
        raise ConfigError(f"{path}: lists no members")
    return members


def load_ensemble(run_dir: str | Path, which: str = "best") -> list[tuple[torch.nn.Module, RunConfig]]:
    """Load every member of an ensemble directory (eval mode, CPU) with its config."""
    return [load_run(member, which) for member in ensemble_members(run_dir)]


def resolve_run_dir(run_dir: str | Path) -> Path:
    """The run directory to load a single model from: member 0 of an ensemble, else ``run_dir``."""
    return ensemble_members(run_dir)[0] if is_ensemble(run_dir) else Path(run_dir)


def fit_ensemble(config: RunConfig | None, k: int, run_dir: str | Path | None = None, resume: bool = False,
                 devices: Any = None, strategy: str | None = None, accelerator: str | None = None) -> Path:
    """Train a deep ensemble: K runs of ``config`` with seeds ``config.seed + k``, one after another.

    Member ``k`` is an ordinary run directory ``RUN_DIR/member{k}`` (same name, seed + k);
    ``RUN_DIR/ensemble.yaml`` lists them (written before training, so an interrupted ensemble
    can be resumed). ``resume=True`` resumes members that have a last checkpoint and trains the
    missing ones (``config`` may then be None: the members' saved configs are used).
    Returns ``RUN_DIR`` (default ``<output_dir>/<name>``).
    """
    if run_dir is None and config is None:
        raise ConfigError("fit_ensemble needs a config or a run directory")
    run_dir = Path(run_dir) if run_dir is not None else Path(config.output_dir) / config.name
    if resume and is_ensemble(run_dir):
        members = ensemble_members(run_dir)
        seeds = (yaml.safe_load((run_dir / ENSEMBLE_FILE).read_text()) or {}).get("seeds") or []
        base = load_config(members[0] / "config.yaml") if (members[0] / "config.yaml").is_file() else config
        for index, member in enumerate(members):
            trainer_options = dict(devices=devices, strategy=strategy, accelerator=accelerator)
            if (member / "checkpoints" / "last.ckpt").is_file():
                fit(load_config(member / "config.yaml"), run_dir=member, resume=True, **trainer_options)
                continue
            if (member / "config.yaml").is_file():
                member_config = load_config(member / "config.yaml")
            elif base is not None and index < len(seeds):
                member_config = dataclasses.replace(base, seed=int(seeds[index]))
            else:
                raise ConfigError(f"cannot resume ensemble member {member}: no config.yaml and no base config")
            fit(member_config, run_dir=member, **trainer_options)
        return run_dir
    if resume:
        raise CheckpointError(f"cannot resume: {run_dir / ENSEMBLE_FILE} not found")
    if config is None:
        raise ConfigError("fit_ensemble needs a config to train a new ensemble")
    if int(k) < 2:
        raise ConfigError(f"an ensemble needs at least 2 members, got --ensemble {k}")
    if is_ensemble(run_dir) or (run_dir / "checkpoints").exists():
        raise ConfigError(f"run directory {run_dir} already holds a run; pass --resume to continue it "
                          f"or choose another --run-dir / name")
    configs = [dataclasses.replace(config, seed=config.seed + index) for index in range(int(k))]
    names = [f"member{index}" for index in range(int(k))]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ENSEMBLE_FILE).write_text(yaml.safe_dump(
        {"name": config.name, "size": int(k), "base_seed": config.seed, "members": names,
         "seeds": [c.seed for c in configs]}, sort_keys=False))
    for name, member_config in zip(names, configs):
        fit(member_config, run_dir=run_dir / name, devices=devices, strategy=strategy, accelerator=accelerator)
    return run_dir
