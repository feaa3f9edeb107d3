"""``anomorph fit``: train one configured model into a self-describing run directory.

Run directory layout::

    RUN_DIR/config.yaml            resolved config (every default filled in)
    RUN_DIR/checkpoints/last.ckpt  state after the latest finished epoch (resume from here)
    RUN_DIR/checkpoints/best.ckpt  lowest val/loss on healthy val slices (weights only: no optimizer state)
    RUN_DIR/logs/csv/sessionN/metrics.csv   CSV log of the N-th (re)start (read all: read_training_log)
    RUN_DIR/logs/tensorboard/sessionN/      TensorBoard events
    RUN_DIR/figures/val_epochNNN.png  reconstructions (first, every train.figure_every_n_epochs-th, last epoch)
    RUN_DIR/.anomorph.lock         flock held by the fit writing this directory (its PID inside)
    RUN_DIR/calibration/           healthy normaliser + FPR thresholds (``anomorph calibrate``; run at
                                   the end of ``fit`` when the manifest has val rows)

A deep ensemble (``anomorph fit --ensemble K``, :func:`fit_ensemble`) is a directory of K such
run directories with seeds ``seed + k``, plus ``ensemble.yaml`` listing them::

    RUN_DIR/ensemble.yaml          name, base seed, members (relative paths) and their seeds
    RUN_DIR/member0 ... memberK-1  ordinary run directories
"""
from __future__ import annotations

import dataclasses
import errno
import io
import logging
import os
import tempfile
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

import yaml

from ..data.io import _UMASK, atomic_write
from ..errors import AnomorphError, CheckpointError
from ..runtime import configure_threads
from ..config import ConfigError, RunConfig, config_to_dict, load_config, save_config
from .datamodule import SliceDataModule
from .module import AnomalyModule
from ..runs import (ENSEMBLE_FILE, ensemble_members, is_ensemble, load_checkpoint, load_ensemble,  # noqa: F401
                    load_run, resolve_run_dir)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a hidden temporary file **in its destination directory**, fsync,
    then rename it onto its final name (an atomic step on one filesystem).

    Lightning's default writes through fsspec's transaction, which stages the file in the system
    temp dir and then *moves* it — a copy across filesystems — so a full disk could leave a
    truncated ``last.ckpt`` under its final name. Here a failed write (disk full, read-only
    folder) leaves the previous checkpoint untouched and removes the temporary file.

    ``background=True`` (what ``fit`` uses): the checkpoint is serialised at once (a snapshot of
    that moment; training goes on), and the write, fsync and rename run on one writer thread, in
    order, while the next epoch trains (they are mostly waiting for the disk: at 64², two writes
    per epoch were most of an epoch's time outside its batches and validation;
    benchmarks/README.md). A write's error is raised at the next save, load or removal, and at
    the latest when the trainer tears down (end of ``fit``, after an exception or Ctrl-C), which
    also waits for every queued write, so ``fit`` never returns with a checkpoint still pending.
    A process killed meanwhile leaves the previous file under the final name and a ``.tmp-*``
    file that the next ``fit`` of the run removes.
    """

    def __init__(self, background: bool = False) -> None:
        super().__init__()
        self.background = background
        self._writer: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        self._raise_failed_writes()
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        if not self.background:
            _write_atomically(buffer, Path(path))
            return
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anomorph-checkpoint")
        self._pending.append(self._writer.submit(_write_atomically, buffer, Path(path)))

    def wait(self) -> None:
        """Block until every queued write has finished; raise the first one's error, if any."""
        pending, self._pending = self._pending, []
        errors = [error for error in (future.exception() for future in pending) if error is not None]
        if errors:
            raise errors[0]

    def _raise_failed_writes(self) -> None:
        if any(future.done() and future.exception() is not None for future in self._pending):
            self.wait()
        self._pending = [future for future in self._pending if not future.done()]

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.wait()
        return super().load_checkpoint(*args, **kwargs)

    def remove_checkpoint(self, path: Any) -> None:
        self.wait()
        super().remove_checkpoint(path)

    def teardown(self) -> None:
        try:
            self.wait()
        finally:
            if self._writer is not None:  # no thread outlives the trainer
                self._writer.shutdown(wait=True)
                self._writer = None


def _write_atomically(buffer: io.BytesIO, path: Path) -> None:
    """``buffer``'s bytes to ``path``: a hidden temporary file in the same folder, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + path.name, dir=path.parent)
    os.close(fd)
    try:
        with open(tmp, "wb") as handle:
            _write_bytes(handle, buffer.getbuffer())
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror or str(err), str(path)) from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_bytes(handle: Any, data: Any) -> None:
    """The single write of a checkpoint's bytes (tests replace it to simulate a full disk)."""
    handle.write(data)


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` after **every** training epoch, whatever val/loss does.

    Lightning 2.6's ``save_last=True`` only rewrites ``last`` when a top-k checkpoint was saved
    in the same step, so with ``monitor="val/loss"`` it froze at the best epoch. This callback has
    no monitor: it saves at each train-epoch end (after that epoch's validation, so the state of
    the ``best`` callback is included) and replaces the previous ``last.ckpt``.
    """

    def __init__(self, dirpath: Path) -> None:
        super().__init__(dirpath=dirpath, filename="last", monitor=None, save_top_k=1, save_last=False,
                         save_on_train_epoch_end=True, enable_version_counter=False)

    @property
    def state_key(self) -> str:
        return "anomorph.LastCheckpoint"

    def _save_checkpoint(self, trainer: "L.Trainer", filepath: str) -> None:
        self.last_model_path = filepath  # part of the saved state; read by last_checkpoint_hint()
        super()._save_checkpoint(trainer, filepath)


LOCK_FILE = ".anomorph.lock"


def _is_worker_rank() -> bool:
    """True in the extra processes Lightning's DDP launcher starts (they rerun this command with
    LOCAL_RANK / NODE_RANK > 0); the rank-0 process holds the lock for all of them."""
    return any(os.environ.get(name, "0") not in ("", "0") for name in ("LOCAL_RANK", "NODE_RANK"))


class RunLock:
    """An exclusive ``flock`` on ``RUN_DIR/.anomorph.lock`` for the duration of a ``fit``.

    A second ``fit`` into the same run directory is refused with the holder's PID (read from the
    lock file). The lock is released by the OS when the process ends, even after SIGKILL; the
    file itself stays (removing it would race with a waiting writer).
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._handle: Any = None

    def __enter__(self) -> "RunLock":
        if _is_worker_rank():  # a DDP worker Lightning started from the locking rank-0 process
            return self
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no locking
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise ConfigError(f"run directory {self.path.parent} is in use by another anomorph process "
                              f"(PID {holder}, lock {self.path}); wait for it to finish or choose another "
                              f"--run-dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the descriptor releases the flock
            self._handle = None


def _check_network(config: RunConfig) -> AnomalyModule:
    """Build the module and run one forward pass at ``data.size`` before anything is written, so a
    bad model name/option or an image size the network cannot take is a one-line ConfigError."""
    try:
        module = AnomalyModule(config_to_dict(config))
    except AnomorphError:
        raise
    except Exception as err:
        raise ConfigError(f"model: cannot build {config.model.name!r} with options {config.model.options}: "
                          f"{_first_line(err)}") from err
    size = config.data.size
    network = module.network
    try:
        network.eval()
        with torch.no_grad():
            network(torch.zeros(2, 1, size, size))
    except Exception as err:
        raise ConfigError(f"data.size: the {config.model.name!r} network (options {config.model.options}) cannot "
                          f"take {size}×{size} images ({_first_line(err)}); use a size that is a multiple "
                          f"of the product of model.strides") from err
    finally:
        network.train()
    return module


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


RESUME_KEYS = ("state_dict", "optimizer_states", "epoch", "global_step", "loops", "hyper_parameters")


def check_resumable(path: Path) -> None:
    """Refuse a ``last.ckpt`` that ``--resume`` cannot continue from: unreadable or unsafe
    (``weights_only=True``), missing the keys Lightning restores, or weights of another shape."""
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (a {type(checkpoint).__name__}, not a dict)")
    missing = [k for k in RESUME_KEYS if k not in checkpoint]
    if missing:
        raise CheckpointError(f"{path}: cannot resume: missing key(s) {missing}")
    load_run(path.parent.parent, "last")  # config + weight shapes against the checkpoint's own config


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
    configure_threads(log=False)  # the line is logged when training starts (after the checks)
    _quiet_lightning()
    run_dir = Path(run_dir) if run_dir is not None else Path(config.output_dir) / config.name
    last = run_dir / "checkpoints" / "last.ckpt"
    if resume:
        if not last.is_file():
            raise CheckpointError(f"cannot resume: {last} not found")
        config = load_config(run_dir / "config.yaml")
        check_resumable(last)
    elif last.exists():
        raise ConfigError(f"run directory {run_dir} already holds checkpoints; pass --resume to continue it "
                          f"or choose another --run-dir / name")
    L.seed_everything(config.seed, workers=True, verbose=False)
    module = _check_network(config)  # before anything is written
    trainer = _build_trainer(config, run_dir, devices, strategy, accelerator, callbacks)
    with RunLock(run_dir):
        if not resume and last.exists():  # another run finished in between
            raise ConfigError(f"run directory {run_dir} already holds checkpoints; pass --resume to continue it")
        return _fit_locked(config, module, trainer, run_dir, last, resume)


def _build_trainer(config: RunConfig, run_dir: Path, devices: Any, strategy: str | None,
                   accelerator: str | None, extra_callbacks: Sequence[Any] = ()) -> L.Trainer:
    """The Trainer (nothing is written yet); a setting Lightning refuses is a ConfigError."""
    t = config.train
    checkpoint_dir = run_dir / "checkpoints"
    # best.ckpt is for scoring (resume reads last.ckpt): weights, config, epoch and step only, no
    # optimizer state (a third of the bytes for Adam), so an improving epoch writes less
    best = ModelCheckpoint(dirpath=checkpoint_dir, filename="best", monitor="val/loss", save_weights_only=True,
                           mode="min", save_top_k=1, save_last=False, enable_version_counter=False)
    callbacks: list = [best, LastCheckpoint(checkpoint_dir), *extra_callbacks]
    if t.early_stopping_patience > 0:
        callbacks.append(EarlyStopping(monitor="val/loss", mode="min", patience=t.early_stopping_patience))
    if t.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=1))
    # each (re)start logs into its own folder: Lightning's CSVLogger would delete an existing metrics.csv
    session = f"session{len(list((run_dir / 'logs' / 'csv').glob('session*')))}"
    options = dict(accelerator=accelerator or t.accelerator, devices=devices if devices is not None else t.devices,
                   strategy=strategy or t.strategy, precision=t.precision)
    try:
        return L.Trainer(
            default_root_dir=run_dir,
            max_epochs=t.max_epochs,
            max_steps=t.max_steps,
            **options,
            callbacks=callbacks,
            plugins=[AtomicCheckpointIO(background=True)],
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
    except Exception as err:  # MisconfigurationException, ValueError: unknown accelerator/precision/strategy
        raise ConfigError(f"train: Lightning refused accelerator={options['accelerator']!r}, "
                          f"devices={options['devices']!r}, strategy={options['strategy']!r}, "
                          f"precision={options['precision']!r}: {_first_line(err)}") from err


def _fit_locked(config: RunConfig, module: AnomalyModule, trainer: L.Trainer, run_dir: Path, last: Path,
                resume: bool) -> Path:
    datamodule = SliceDataModule(config.data, seed=config.seed)
    checkpoint_dir = run_dir / "checkpoints"
    if not _is_worker_rank():
        for stale in [*checkpoint_dir.glob(".tmp-*"), *(run_dir / "figures").glob(".tmp-*")]:
            stale.unlink(missing_ok=True)  # a killed run's half-written temporaries (we hold the lock)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:  # a resumed run keeps its config.yaml as it is
        save_config(config, run_dir / "config.yaml")
    module.figure_dir = run_dir / "figures"
    module.figure_dir.mkdir(exist_ok=True)
    configure_threads()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if resume else None, weights_only=True)
    except OSError as err:
        if err.errno in _DISK_ERRNOS:
            raise CheckpointError(f"cannot write {err.filename or run_dir}: {err.strerror}; the previous "
                                  f"checkpoints in {checkpoint_dir} are intact (resume with --resume "
                                  f"{run_dir})") from err
        raise
    if trainer.is_global_zero:
        _calibrate_after_fit(run_dir, config)
    return run_dir


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _calibrate_after_fit(run_dir: Path, config: RunConfig) -> None:
    """``anomorph calibrate`` on the finished run when its manifest has val rows (a failure is
    reported, not raised: the trained run stays usable; calibrate it again by hand)."""
    import sys

    from ..data.manifest import read_manifest
    from ..errors import AnomorphError
    from ..evaluation.calibrate import calibrate

    try:
        if not any(r.split == "val" for r in read_manifest(config.data.manifest)):
            return
        calibrate(run_dir)
    except AnomorphError as err:
        print(f"anomorph: warning: calibration after training skipped ({err}); run `anomorph calibrate "
              f"--run {run_dir}`", file=sys.stderr)


def read_training_log(run_dir: str | Path, superseded: bool = False) -> list[dict[str, str]]:
    """The rows of a run's CSV training logs, oldest session first (a resumed run has several).

    A resumed session restarts at the epoch after its checkpoint; rows of that epoch and later
    ones logged by earlier sessions describe training whose checkpoint never landed (a kill
    after the log was written, or a checkpoint write that failed: checkpoints are written in
    the background, :class:`AtomicCheckpointIO`) and are left out, so each epoch appears once,
    as the weights that exist were trained. ``superseded=True``: every row of every session."""
    import csv

    rows: list[dict[str, str]] = []
    sessions = sorted((Path(run_dir) / "logs" / "csv").glob("session*"), key=lambda p: int(p.name[7:]))
    for session in sessions:
        path = session / "metrics.csv"
        if not path.is_file():
            continue
        with path.open(newline="") as handle:
            session_rows = list(csv.DictReader(handle))
        epochs = [int(row["epoch"]) for row in session_rows if row.get("epoch")]
        if epochs and not superseded:
            first = min(epochs)
            rows = [row for row in rows if not row.get("epoch") or int(row["epoch"]) < first]
        rows.extend(session_rows)
    return rows


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
        with RunLock(run_dir):  # one writer per ensemble directory too (members lock their own)
            return _resume_ensemble(config, run_dir, devices, strategy, accelerator)
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
    with RunLock(run_dir):
        if is_ensemble(run_dir):
            raise ConfigError(f"run directory {run_dir} already holds an ensemble; pass --resume to continue it")
        atomic_write(run_dir / ENSEMBLE_FILE, lambda tmp: Path(tmp).write_text(yaml.safe_dump(
            {"name": config.name, "size": int(k), "base_seed": config.seed, "members": names,
             "seeds": [c.seed for c in configs]}, sort_keys=False)))
        for name, member_config in zip(names, configs):
            fit(member_config, run_dir=run_dir / name, devices=devices, strategy=strategy, accelerator=accelerator)
    return run_dir


def _resume_ensemble(config: RunConfig | None, run_dir: Path, devices: Any, strategy: str | None,
                     accelerator: str | None) -> Path:
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
