"""Run directories for inference: load a trained network and its config without Lightning.

Everything here reads plain files only: checkpoints with ``torch.load(weights_only=True)`` (tensors
and containers, never code), ``config.yaml`` / ``ensemble.yaml`` with ``yaml.safe_load``. Training
(:mod:`anomorph.training`) writes these files; scoring, evaluation and the uncertainty estimators
load them from here, so loading a run never imports the training package.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
import yaml

from .config import ConfigError, RunConfig, config_from_dict
from .errors import CheckpointError


def network_options(config: RunConfig) -> dict[str, Any]:
    """The :func:`build_network` arguments of a run: model options plus the data's image size."""
    options = {"name": config.model.name, **config.model.options}
    options.setdefault("image_size", config.data.size)
    options.setdefault("in_channels", 1)
    if config.guidance.strategy == "conditioned":
        options.setdefault("guidance_channels", 1)
    return options


def checkpoint_path(run_dir: str | Path, which: str = "best") -> Path:
    """``RUN_DIR/checkpoints/{which}.ckpt`` ("best" falls back to "last" when missing)."""
    run_dir = Path(run_dir)
    path = run_dir / "checkpoints" / f"{which}.ckpt"
    if not path.is_file() and which == "best":
        path = run_dir / "checkpoints" / "last.ckpt"
    return path


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    path = checkpoint_path(run_dir, which)
    checkpoint = load_checkpoint(path)
    try:
        config_dict = checkpoint["hyper_parameters"]["config"]
        state = checkpoint["state_dict"]
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: not an anomorph checkpoint (no hyper_parameters.config/state_dict)") from err
    config = config_from_dict(config_dict)
    from .networks import build_network

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


HEAD_DIR = "noncorrespondence"
HEAD_WEIGHTS = "head.pt"
HEAD_INFO = "head.json"


def head_dir(run_dir: str | Path) -> Path:
    """``RUN_DIR/noncorrespondence/``: the learned non-correspondence head of a deformable run."""
    return Path(run_dir) / HEAD_DIR


def has_head(run_dir: str | Path) -> bool:
    return (head_dir(run_dir) / HEAD_WEIGHTS).is_file() and (head_dir(run_dir) / HEAD_INFO).is_file()


def load_head(run_dir: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The non-correspondence head of a run (eval mode, CPU) and its ``head.json`` (network
    options, training settings, losses). Weights are read with ``weights_only=True``."""
    import json

    from .networks import NonCorrespondenceNet

    folder = head_dir(run_dir)
    if not has_head(run_dir):
        raise ConfigError(f"{run_dir} has no non-correspondence head ({folder / HEAD_WEIGHTS}); "
                          f"train one with `anomorph fit-head --run {run_dir}`")
    try:
        info = json.loads((folder / HEAD_INFO).read_text())
        network = NonCorrespondenceNet(**info["network"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{folder / HEAD_INFO}: unreadable head description ({err})") from err
    state = load_checkpoint(folder / HEAD_WEIGHTS)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{folder / HEAD_WEIGHTS}: weights do not match {HEAD_INFO}: "
                              f"{str(err).splitlines()[0]} ...") from err
    return network.eval(), info
