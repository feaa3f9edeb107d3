"""Run configuration: YAML files in ``configs/``, validated into dataclasses, with overrides.

Overrides use dotted keys and YAML values, e.g. ``train.max_epochs=5`` or
``model.channels=[16,32,64]``. Unknown keys and wrongly typed values are errors that name the key.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError




@dataclass
class DataConfig:
    """Where the data is and how slices are made (see :class:`anomorph.data.SliceConfig`).

    manifest: path to manifest.csv (relative paths resolve against the working directory).
    size: model input side length in pixels. axis / slice_range / percentiles /
    min_brain_fraction: as in SliceConfig. batch_size: slices per batch. num_workers:
    DataLoader workers (0 = main process; slices are already in memory).
    """

    manifest: str = "phantom/manifest.csv"
    size: int = 64
    axis: int = -1
    slice_range: list[int] | None = None
    percentiles: list[float] = field(default_factory=lambda: [1.0, 99.0])
    min_brain_fraction: float = 0.05
    batch_size: int = 16
    num_workers: int = 0


@dataclass
class ModelConfig:
    """Network architecture, passed to :func:`anomorph.networks.build_network`.

    name: "ae", "vae" or "morphaeus". Other keys are that network's constructor arguments.
    """

    name: str = "ae"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """Optimisation and the loss schedule (SPEC §3).

    lr: Adam learning rate. max_epochs / max_steps: stopping limits (max_steps -1 = none).
    ssim_weight: weight of (1 − SSIM) added to MSE. kl_weight: VAE KL weight.
    warmup_epochs: epochs of reconstruction-only training before the registration terms start.
    ncc_weight: weight of the local NCC term (9×9 window, ``ncc_window``).
    beta_start / beta_end / beta_ramp_epochs: β on ‖∇v‖², ramped linearly after the warm-up.
    bidirectional: also add NCC between x̂ and x warped by the inverse field.
    early_stopping_patience: validation epochs without improvement before stopping (0 = off).
    channels_last: on CPU, store a 2-d network and its batches channels-last (NHWC) while training:
        oneDNN's convolutions skip a layout conversion per layer (the train variants table of
        benchmarks/README.md measures it). Same function, float rounding differs. Ignored on
        other devices and for 3-d networks.
    figure_every_n_epochs: write ``figures/val_epochNNN.png`` at the first validated epoch, every
        n-th epoch and the last one (a figure costs about 0.3 s on 2 CPU cores).
    accelerator / devices / strategy / precision: passed to Lightning's Trainer.
    synthetic_anomalies: anomaly-aware registration training (deformable AE only; issue 12's
        joint registration–non-correspondence idea, as in NCR-Net, amortised into the field). At
        every training step each slice gets, with ``guidance.mask_probability``, synthetic anomalies
        (:func:`anomorph.guidance.masks.synthetic_corruption`: pasted intensities, rescaled tissue
        or a foreign patch inside random blobs — not the phantom's lesion generator). The prior x̂
        is still computed from, and reconstructs, the *clean* slice; the field reads the corrupted
        one and registers x̂ to it with the NCC masked by (1 − m) and the guidance's local prior
        (β·(1 + ``guidance.alpha``·m) on ‖∇v‖², ``guidance.anchor_weight``·m·(‖d‖² +
        ``guidance.gamma``·(log det Jφ)²)) on the synthetic mask m. The field is thus never
        rewarded for registering an anomaly away, and is penalised for deforming inside one; at
        inference it needs no u (any ``guidance.strategy`` still applies on top).
    synthetic_max_blobs / synthetic_radius_range: with ``synthetic_anomalies``, each corrupted
        slice gets 1..max_blobs blobs with radii in [low, high] (fractions of the image side:
        at 64², the default [0.03, 0.15] is about 2–10 pixels).
    field_consistency_weight: with ``synthetic_anomalies``, field-consistency training (null =
        off). A number w ≥ 0: the same network also registers x̂ to the *clean* slice (plain
        NCC; its registration terms are averaged with the corrupted slice's), and
        w · mean over pixels of ‖d(corrupted) − d(clean)‖² (pixels², gradient into both) ties the
        two fields. It asks the field to register a slice with synthetic anomalies as it
        registers the healthy slice underneath: inside m (no registering away), at its rim and
        everywhere else (no stiffening of healthy tissue, which a hold β(1 + α·m) and the anchor
        do not give). w = 0 is the control: both fields trained, not tied. Use with
        ``guidance.alpha: 0`` and ``guidance.anchor_weight: 0`` (configs/morphaeus_consistent.yaml).
    consistency_teacher_decay: with ``field_consistency_weight``, the target of the tie (null =
        the network's own clean field, gradient into both). A decay δ ∈ [0, 1): the target is the
        clean slice's field given by a *mean teacher*, an exponential moving average of the
        network's weights and buffers (after every optimiser step, teacher ← δ·teacher +
        (1 − δ)·network; ``torch.optim.swa_utils.AveragedModel``), run in eval mode without
        gradient; the tie then trains only the corrupted slice's field. The symmetric tie is
        cheapest to satisfy by shrinking both fields, and a target without gradient taken from
        the network itself moves with every update; the teacher is neither trained by the tie nor
        moved by one step (time constant 1 / (1 − δ) steps). The clean branch is still trained
        with the plain NCC, so weight 0 is the same control as without a teacher.
        (configs/morphaeus_teacher.yaml.)
    consistency_teacher_run: with ``field_consistency_weight``, the other target of the tie: the
        directory of a trained deformable run (same ``data.size``) whose network, frozen, gives the
        clean slice's field (eval mode, no gradient, never updated). A converged healthy
        registration as the target from the first step: no lag behind the network and nothing
        the tie can shrink. Not with ``consistency_teacher_decay``. A run trained with it needs the
        teacher run to resume (the teacher's weights are also in its checkpoints); ``load_run``,
        ``predict`` and ``evaluate`` use the network only. (configs/morphaeus_distilled.yaml.)
    finetune_from_teacher: with ``consistency_teacher_run``, start from the teacher's weights and
        train the velocity head only: the prior (encoder and decoder) is frozen and kept in eval
        mode, so x̂ is the teacher's x̂ and the tie's target is a field for the same x̂ (a field
        registers one particular x̂ to x; a student with its own prior cannot copy a teacher's
        field without misregistering its own x̂). Use with ``warmup_epochs: 0`` (the warm-up
        trains only the prior).
    synthetic_anomaly_mask: with ``synthetic_anomalies``, whether the registration loss uses m
        (default). False is the control that isolates the mask: the same corrupted slices, the
        field registering x̂ to them with the plain NCC and uniform β (it is then rewarded for
        registering the anomalies away, as an unguided model would be on a lesion).
    """

    lr: float = 5e-4
    weight_decay: float = 0.0
    max_epochs: int = 20
    max_steps: int = -1
    ssim_weight: float = 1.0
    kl_weight: float = 1e-3
    warmup_epochs: int = 5
    ncc_weight: float = 1.0
    ncc_window: int = 9
    beta_start: float = 1e-3
    beta_end: float = 3.0
    beta_ramp_epochs: int = 10
    bidirectional: bool = False
    early_stopping_patience: int = 0
    check_val_every_n_epoch: int = 1
    figure_every_n_epochs: int = 5
    channels_last: bool = True
    limit_train_batches: float | int = 1.0
    accelerator: str = "auto"
    devices: str | int | list[int] = "auto"
    strategy: str = "auto"
    precision: str = "32-true"
    log_every_n_steps: int = 10
    progress_bar: bool = True
    synthetic_anomalies: bool = False
    synthetic_max_blobs: int = 3
    synthetic_radius_range: list[float] = field(default_factory=lambda: [0.03, 0.15])
    synthetic_anomaly_mask: bool = True
    field_consistency_weight: float | None = None
    consistency_teacher_decay: float | None = None
    consistency_teacher_run: str | None = None
    finetune_from_teacher: bool = False


@dataclass
class GuidanceConfig:
    """Uncertainty-guided regularisation of the deformation (deformable models only; SPEC §3).

    strategy: "none", "gating", "conditioned", "map", "cost_masking", "tto" or "iterative" (used
        at inference; see :mod:`anomorph.scoring.strategies`; "conditioned" also changes training:
        the head reads m, see below).
    estimator: uncertainty estimator giving u (see docs/uncertainty.md).
    normalise: z-score u against the estimator's statistics on healthy val slices; the mask is
        then cut from that z-score. normaliser_mode: "pixel" (statistics at the same model-grid
        pixel) or "tissue" (same intensity × gradient bin of x̂), see docs/uncertainty.md.
    threshold / softness: m = clamp((score − threshold + softness) / softness, 0, 1), score =
        the healthy z-score (normalise on; units: healthy standard deviations) or u (normalise
        off; threshold in [0, 1]). m = 1 where score ≥ threshold, 0 where score ≤ threshold −
        softness. hysteresis (None = off; a ratio in (0, 1], threshold > 0): m is also 1 on
        every pixel with score ≥ hysteresis · threshold that is connected (8-neighbourhood in 2-d)
        through such pixels to one with score ≥ threshold — hysteresis thresholding as in Canny's
        edge linking, whose low threshold is likewise a fraction of the high one: a lesion's
        fainter rim joins its core, an isolated faint spot does not. dilation: pixels, applied to
        m (and to the oracle's ground-truth mask).
    Conditioned-head training (and ``train.synthetic_anomalies``, which uses mask_probability,
    alpha, anchor_weight and gamma the same way): synthetic blob masks m (``mask_probability``
    of the samples get blobs), pasted intensity changes inside them with ``paste_probability``
    (conditioned head only); the smoothness
    weight becomes λ(x) = β·(1 + alpha·m(x)) on ‖∇v‖² and a local anchor anchor_weight·m·(‖d‖² +
    gamma·(log det Jφ)²) is added; the NCC is cost-function masked by (1 − m).
    Test-time strategies (map, cost_masking, tto): ``map_steps`` Adam steps (lr ``map_lr``,
    pixels) on v minimising masked-LNCC + map_lambda·‖∇v‖² + map_anchor·mean(m‖d‖²) (map);
    without the anchor (cost_masking); plain LNCC, m = 0 (tto). iterative: ``rounds``
    registrations in all (1 = plain), each later one gated by the z-scored residual of the
    previous one.
    """

    strategy: str = "none"
    estimator: str = "residual_z"
    normalise: bool = True
    normaliser_mode: str = "pixel"
    threshold: float = 3.0
    softness: float = 1.0
    hysteresis: float | None = None
    dilation: int = 1
    mask_probability: float = 0.75
    paste_probability: float = 0.5
    alpha: float = 20.0
    anchor_weight: float = 1.0
    gamma: float = 0.1
    map_steps: int = 30
    map_lr: float = 0.05
    map_lambda: float = 1.0
    map_anchor: float = 10.0
    rounds: int = 2


# the names networks.factory.NETWORKS builds (config sits below networks; a test keeps them equal)
MODEL_NAMES = ("ae", "vae", "morphaeus")
STRATEGIES = ("none", "gating", "conditioned", "map", "cost_masking", "tto", "iterative")


@dataclass
class RunConfig:
    """A whole run: ``seed`` fixes data order, initialisation and dropout."""

    name: str = "run"
    seed: int = 0
    output_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)


def _check_type(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _check_type(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not {annotation}")
    if annotation is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_type(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(annotation):
        return _from_dict(annotation, value, key)
    return value


def _from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = prefix or "top level"
        raise ConfigError(f"unknown key(s) {unknown} at {where}; allowed: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _check_type(value, hints[name], f"{prefix}.{name}" if prefix else name)
    return cls(**kwargs)


def _check_ranges(config: RunConfig) -> None:
    """Values the type check lets through but training cannot use; each error names the key."""
    d, t = config.data, config.train

    def need(ok: bool, key: str, value: Any, rule: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {value!r} is invalid; {rule}")

    finite = lambda v: isinstance(v, (int, float)) and math.isfinite(v)  # noqa: E731
    need(d.size >= 8, "data.size", d.size, "the slice size must be at least 8 pixels")
    need(d.batch_size >= 1, "data.batch_size", d.batch_size, "must be >= 1")
    need(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
    need(d.axis in (-3, -2, -1, 0, 1, 2), "data.axis", d.axis, "must be one of 0, 1, 2 (or -3..-1)")
    if d.slice_range is not None:
        need(len(d.slice_range) == 2 and 0 <= d.slice_range[0] < d.slice_range[1], "data.slice_range",
             d.slice_range, "must be [start, stop] with 0 <= start < stop")
    need(len(d.percentiles) == 2 and all(finite(p) for p in d.percentiles)
         and 0 <= d.percentiles[0] < d.percentiles[1] <= 100, "data.percentiles", d.percentiles,
         "must be [low, high] with 0 <= low < high <= 100")
    need(finite(d.min_brain_fraction) and 0 <= d.min_brain_fraction <= 1, "data.min_brain_fraction",
         d.min_brain_fraction, "must be in [0, 1]")
    need(t.max_epochs >= 1 or (t.max_epochs == -1 and t.max_steps >= 1), "train.max_epochs", t.max_epochs,
         "must be >= 1 (0 epochs would write no checkpoint; -1 = unlimited only with train.max_steps)")
    need(t.max_steps == -1 or t.max_steps >= 1, "train.max_steps", t.max_steps, "must be >= 1, or -1 for no limit")
    need(finite(t.lr) and t.lr > 0, "train.lr", t.lr, "the learning rate must be a finite number > 0")
    for key in ("weight_decay", "ssim_weight", "kl_weight", "ncc_weight", "beta_start", "beta_end"):
        value = getattr(t, key)
        need(finite(value) and value >= 0, f"train.{key}", value, "must be a finite number >= 0")
    for key in ("warmup_epochs", "beta_ramp_epochs", "early_stopping_patience"):
        need(getattr(t, key) >= 0, f"train.{key}", getattr(t, key), "must be >= 0")
    for key in ("check_val_every_n_epoch", "log_every_n_steps", "figure_every_n_epochs"):
        need(getattr(t, key) >= 1, f"train.{key}", getattr(t, key), "must be >= 1")
    need(t.ncc_window >= 1 and t.ncc_window % 2 == 1, "train.ncc_window", t.ncc_window, "must be an odd number >= 1")
    need(finite(t.limit_train_batches) and t.limit_train_batches > 0, "train.limit_train_batches",
         t.limit_train_batches, "must be > 0 (a fraction <= 1.0 or a number of batches)")
    need(t.field_consistency_weight is None or (finite(t.field_consistency_weight) and t.field_consistency_weight >= 0),
         "train.field_consistency_weight", t.field_consistency_weight, "must be null (off) or a finite number >= 0")
    need(t.consistency_teacher_decay is None or (finite(t.consistency_teacher_decay)
                                                 and 0 <= t.consistency_teacher_decay < 1),
         "train.consistency_teacher_decay", t.consistency_teacher_decay, "must be null (off) or a number in [0, 1)")
    need(t.synthetic_max_blobs >= 1, "train.synthetic_max_blobs", t.synthetic_max_blobs, "must be >= 1")
    need(len(t.synthetic_radius_range) == 2 and all(finite(r) for r in t.synthetic_radius_range)
         and 0 < t.synthetic_radius_range[0] <= t.synthetic_radius_range[1] < 0.5, "train.synthetic_radius_range",
         t.synthetic_radius_range, "must be [low, high] with 0 < low <= high < 0.5 (fractions of the image side)")
    need(0 <= config.seed < 2**32, "seed", config.seed, "must be in [0, 2**32)")
    need(config.model.name.lower() in MODEL_NAMES, "model.name", config.model.name, f"must be one of {sorted(MODEL_NAMES)}")


def check_guidance(g: GuidanceConfig) -> GuidanceConfig:
    """Raise a :class:`ConfigError` naming the ``guidance.`` key of the first value of ``g`` that
    no strategy can use (ranges only; the strategy name is checked by the caller); returns ``g``."""
    for key, low in (("softness", 0), ("dilation", 0), ("rounds", 1), ("map_steps", 0)):
        if not getattr(g, key) >= low:
            raise ConfigError(f"guidance.{key}: must be >= {low}, got {getattr(g, key)!r}")
    for key in ("mask_probability", "paste_probability"):
        if not 0 <= getattr(g, key) <= 1:
            raise ConfigError(f"guidance.{key}: must be a probability in [0, 1], got {getattr(g, key)!r}")
    for key in ("alpha", "anchor_weight", "gamma", "map_lambda", "map_anchor"):
        if not (math.isfinite(getattr(g, key)) and getattr(g, key) >= 0):
            raise ConfigError(f"guidance.{key}: must be a finite number >= 0, got {getattr(g, key)!r}")
    if g.hysteresis is not None and not (isinstance(g.hysteresis, (int, float)) and 0 < g.hysteresis <= 1
                                         and g.threshold > 0):
        raise ConfigError(f"guidance.hysteresis: must be a ratio in (0, 1] of a positive guidance.threshold "
                          f"(threshold {g.threshold!r}), or null for none; got {g.hysteresis!r}")
    if g.normaliser_mode not in ("pixel", "tissue"):
        raise ConfigError(f"guidance.normaliser_mode: {g.normaliser_mode!r} is not one of ('pixel', 'tissue')")
    if not g.normalise and not 0 <= g.threshold <= 1:
        raise ConfigError(f"guidance.threshold: {g.threshold!r} must be in [0, 1] when guidance.normalise is "
                          "false (the mask is cut from u itself)")
    return g


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Validate a plain dict (e.g. parsed YAML) into a :class:`RunConfig`."""
    config = _from_dict(RunConfig, data)
    if config.guidance.strategy not in STRATEGIES:
        raise ConfigError(f"guidance.strategy: {config.guidance.strategy!r} is not one of {STRATEGIES}")
    check_guidance(config.guidance)
    if config.guidance.strategy != "none" and config.model.name != "morphaeus":
        raise ConfigError(f"guidance.strategy {config.guidance.strategy!r} needs a deformable model "
                          f"(model.name: morphaeus), got {config.model.name!r}")
    if config.train.synthetic_anomalies and config.model.name != "morphaeus":
        raise ConfigError(f"train.synthetic_anomalies needs a deformable model (model.name: morphaeus), "
                          f"got {config.model.name!r}")
    if not config.train.synthetic_anomaly_mask and not config.train.synthetic_anomalies:
        raise ConfigError("train.synthetic_anomaly_mask: false only applies with train.synthetic_anomalies: true "
                          "(the control of anomaly-aware training)")
    if config.train.field_consistency_weight is not None and not config.train.synthetic_anomalies:
        raise ConfigError("train.field_consistency_weight: only applies with train.synthetic_anomalies: true "
                          f"(it compares the fields of a slice with and without them), got "
                          f"{config.train.field_consistency_weight!r}")
    if config.train.consistency_teacher_decay is not None and config.train.field_consistency_weight is None:
        raise ConfigError("train.consistency_teacher_decay: only applies with train.field_consistency_weight set "
                          f"(it is the target of that tie), got {config.train.consistency_teacher_decay!r}")
    if config.train.consistency_teacher_run is not None:
        if config.train.field_consistency_weight is None:
            raise ConfigError("train.consistency_teacher_run: only applies with train.field_consistency_weight set "
                              f"(it is the target of that tie), got {config.train.consistency_teacher_run!r}")
        if config.train.consistency_teacher_decay is not None:
            raise ConfigError("train.consistency_teacher_run: not with train.consistency_teacher_decay (a frozen "
                              "teacher or a mean teacher, not both); set one of them to null")
    if config.train.finetune_from_teacher and config.train.consistency_teacher_run is None:
        raise ConfigError("train.finetune_from_teacher: true needs train.consistency_teacher_run (the run whose "
                          "weights it starts from)")
    if config.train.synthetic_anomalies and config.guidance.strategy == "conditioned":
        raise ConfigError("train.synthetic_anomalies: not with guidance.strategy 'conditioned', which trains "
                          "its own synthetic masks as the head's input; use one or the other")
    _check_ranges(config)
    return config


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict, in place.

    ``model.<key>`` is shorthand for ``model.options.<key>`` when ``<key>`` is not ``name``.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.max_epochs=5")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) >= 2 and parts[0] == "model" and parts[1] not in ("name", "options"):
            parts.insert(1, "options")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({err})") from err
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = value
    return data


def read_yaml(path: Path) -> Any:
    """Parse a YAML file; a non-UTF-8 file or invalid YAML is a one-line ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 text (byte {err.object[err.start]:#04x}); "
                          f"save the file as UTF-8") from err
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML ({' '.join(str(err).split())})") from err


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or defaults when ``path`` is None), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = read_yaml(path)
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    apply_overrides(data, overrides or [])
    try:
        return config_from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{path or 'config'}: {err}") from err


def save_config(config: RunConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically)."""
    from .data.io import atomic_write

    text = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    return atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
