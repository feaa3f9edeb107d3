"""The uncertainty estimators of SPEC §3 and :func:`build_estimator`.

=================  ==========================================================  ==============
name               raw map                                                     units
=================  ==========================================================  ==============
``mc_dropout``     std of x̂ (or x̃, or ‖d‖) over N seeded dropout passes        intensity / px
``ensemble``       std of x̂ (or x̃, or ‖d‖) over K independently seeded runs    intensity / px
``tta``            std of x̂ (or x̃, or ‖d‖) over augmentations mapped back      intensity / px
``aleatoric``      predicted std exp(½ log σ²) of a heteroscedastic decoder     intensity
``registration``   forward–backward inconsistency ‖d_f + d_b ∘ (id + d_f)‖     pixels
``residual_z``     prior residual |x − x̂| (÷ predicted std when available)    intensity / σ
``deformation``    |log det Jφ| or ‖d‖ of the unguided registration             — / pixels
``warped_residual``  registered residual |x − x̃| of the unguided registration  intensity
``noncorrespondence``  −log(1 − p), p = learned head's P(no healthy counterpart)  nats
``field_disagreement``  ‖d − d_tied‖ against a head fine-tuned not to follow anomalies  pixels
``RULE(a,b,...)``  max / mean / min of the parts' healthy z-scores              healthy SDs
=================  ==========================================================  ==============

Intensities are those of the [0, 1] model-grid images; for C > 1 channels the raw map is the
root mean square over channels. The first six never read the registration's result. The last
four describe the *unguided* registration (φ, |x − x̃|, or a head reading x̃): they depend on φ, so they may only
guide a second registration at inference (every guided strategy registers again), never a
training loss (SPEC §3 pitfalls). A combination (:mod:`.combined`) depends on φ when any part does.
"""
from __future__ import annotations

import inspect
import math
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .base import (
    UncertaintyEstimator,
    channel_rms,
    draw_seed,
    eval_mode,
    is_deformable,
    prior_network,
    sample_moments,
)
from .combined import CombinedEstimator, parse_combination

TARGETS = ("prior", "warped", "displacement")
_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (value ^ (value >> 31)) & ((1 << 63) - 1)


def child_seed(seed: int, *indices: int) -> int:
    """A well-mixed 63-bit seed for the child ``indices`` of ``seed`` (SplitMix64 chain)."""
    value = _splitmix64(int(seed))
    for index in indices:
        value = _splitmix64(value ^ (int(index) * 0xD1B54A32D192ED03 & _MASK64))
    return value


def _check_target(name: str, target: str) -> str:
    if target not in TARGETS:
        raise ConfigError(f"{name}: target must be one of {TARGETS}, got {target!r}")
    return target


def _require_deformable(name: str, network: nn.Module, what: str) -> None:
    if not is_deformable(network):
        raise ConfigError(f"{name}: {what} needs a deformable network (model.name: morphaeus); "
                         f"got {type(network).__name__}")


def _repeat(tensor: torch.Tensor, times: int) -> torch.Tensor:
    """Pass-major repetition: ``(B, ...)`` → ``(times·B, ...)``, entry ``n·B + b`` = ``tensor[b]``."""
    return tensor.repeat(times, *([1] * (tensor.ndim - 1)))


def _sample_maps(name: str, samples: dict[str, torch.Tensor], target: str
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Raw map and extras from ``(N, B, ...)`` samples of reconstruction / warped / displacement."""
    extras: dict[str, torch.Tensor] = {}
    for key, prefix in (("reconstruction", ""), ("warped", "warped_")):
        if key in samples:
            mean, variance = sample_moments(samples[key])
            extras[f"{prefix}mean"], extras[f"{prefix}variance"] = mean, variance
    if "displacement" in samples:
        mean, variance = sample_moments(samples["displacement"])
        extras["displacement_mean"] = mean
        extras["displacement_variance"] = variance.sum(1, keepdim=True)
    if target == "prior":
        raw = channel_rms(extras["variance"].sqrt())
    elif target == "warped":
        raw = channel_rms(extras["warped_variance"].sqrt())
    else:
        raw = extras["displacement_variance"].sqrt()
    extras["n_samples"] = torch.tensor(next(iter(samples.values())).shape[0])
    return raw, extras


def _outputs(network: nn.Module, images: torch.Tensor, target: str) -> dict[str, torch.Tensor]:
    """One deterministic forward: the tensors ``target`` needs (prior only: the head is skipped)."""
    if target == "prior":
        out = prior_network(network)(images)
        return {"reconstruction": out.reconstruction}
    out = network(images)
    return {"reconstruction": out.reconstruction, "warped": out.warped, "displacement": out.displacement}


# ----------------------------------------------------------------------------- MC dropout
DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def dropout_layers(module: nn.Module) -> list[nn.Module]:
    """The dropout modules of ``module`` in registration order."""
    return [m for m in module.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]


class SeededDropout:
    """Context manager: every dropout layer of ``network`` samples seeded masks, in any mode.

    A forward hook replaces each dropout layer's output by ``input · mask / (1 − p)``. The mask
    of layer ``l`` for MC pass ``n`` is drawn from a generator seeded with
    ``child_seed(seed, l, n)``, so it does not depend on how the passes are batched: set
    :attr:`passes` to the pass indices of the next forward, whose batch is pass-major
    (entry ``i·B + b`` = pass ``passes[i]``, image ``b``). ``shared=True`` uses one mask per pass
    for all B images (the same N thinned sub-networks for every image: a slice's map does not
    depend on its batch); ``shared=False`` draws one per image (then it depends on the position
    in the batch). ``p`` overrides every layer's probability (None = each layer's own ``p``).
    ``nn.Dropout`` is element-wise, ``nn.Dropout1d/2d/3d`` channel-wise.
    """

    def __init__(self, network: nn.Module, seed: int, p: float | None = None, shared: bool = True) -> None:
        self.layers = dropout_layers(network)
        for layer in self.layers:
            if not isinstance(layer, DROPOUT_TYPES):
                raise NotImplementedError(f"MC dropout does not support {type(layer).__name__}")
        if p is not None and not 0.0 <= float(p) < 1.0:
            raise ConfigError(f"dropout probability must be in [0, 1), got {p}")
        self.seed = int(seed)
        self.p = None if p is None else float(p)
        self.shared = shared
        self.passes: Sequence[int] = (0,)
        self._handles: list[Any] = []
        self._copies: list[tuple[int, nn.Module, bool]] = []

    def also_on(self, original: nn.Module, copy: nn.Module) -> None:
        """Also sample masks in ``copy``, a structural copy of ``original`` (a submodule of the
        network): its dropout layers get the seeds of the matching layers of ``original``."""
        index_of = {id(layer): i for i, layer in enumerate(self.layers)}
        # a dropout layer that is not the first child of an nn.Sequential reads its previous
        # sibling's fresh output, which nothing else holds: the copy may scale it in place
        intermediate = {id(child) for parent in copy.modules() if isinstance(parent, nn.Sequential)
                        for child in list(parent)[1:]}
        for layer, twin in zip(dropout_layers(original), dropout_layers(copy)):
            self._copies.append((index_of[id(layer)], twin, id(twin) in intermediate))

    def probability(self, layer: nn.Module) -> float:
        return float(layer.p) if self.p is None else self.p

    @property
    def active(self) -> bool:
        """True when at least one layer drops with a positive probability."""
        return any(self.probability(layer) > 0 for layer in self.layers)

    def _hook(self, index: int, in_place: bool = False):
        """The forward hook of dropout layer ``index``; ``in_place``: scale the layer's input in
        place (only for layers whose input is an intermediate nothing else reads, see
        :meth:`also_on`, and only without autograd)."""

        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            x = inputs[0]
            p = self.probability(module)
            if p == 0.0:
                return x
            n_passes = len(self.passes)
            per_pass = x.shape[0] // n_passes
            if per_pass * n_passes != x.shape[0]:
                raise RuntimeError(f"batch {x.shape[0]} is not a multiple of {n_passes} passes")
            rest = tuple(x.shape[1:])
            if not isinstance(module, nn.Dropout):  # channel-wise: one draw per (image, channel)
                rest = rest[:1] + (1,) * (len(rest) - 1)
            shape = (1 if self.shared else per_pass, *rest)
            draws = []
            for n in self.passes:
                generator = torch.Generator(device=x.device).manual_seed(child_seed(self.seed, index, n))
                draws.append(torch.rand(shape, generator=generator, device=x.device, dtype=x.dtype))
            # (passes, 1 or B, ...) factors 0 or 1/(1-p), broadcast over the pass-major batch: one
            # elementwise pass, no full-size mask (equals x * mask / (1 - p) up to one rounding)
            scale = torch.stack(draws).ge_(p).mul_(1.0 / (1.0 - p))
            if x.ndim >= 3 and not x.is_contiguous() and _is_channels_last(x):
                # lay the factor out like x (channels innermost): a broadcast multiply across
                # mismatched layouts runs several times slower than the elementwise pass itself
                scale = _channels_innermost(scale)
            if in_place and not torch.is_grad_enabled() and not x.requires_grad:
                x.view(n_passes, per_pass, *x.shape[1:]).mul_(scale)
                return x
            return (x.view(n_passes, per_pass, *x.shape[1:]) * scale).view(x.shape)

        return hook

    def __enter__(self) -> "SeededDropout":
        self._handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]
        self._handles += [layer.register_forward_hook(self._hook(i, in_place))
                          for i, layer, in_place in self._copies]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _is_channels_last(x: torch.Tensor) -> bool:
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.ndim)
    return fmt is not None and x.is_contiguous(memory_format=fmt)


def _channels_innermost(scale: torch.Tensor) -> torch.Tensor:
    """``(P, 1|B, C, *spatial)`` with the same values, stored with C as the fastest axis."""
    order = (0, 1, *range(3, scale.ndim), 2)
    inverse = (0, 1, scale.ndim - 1, *range(2, scale.ndim - 1))
    return scale.permute(order).contiguous().permute(inverse)


#: pixels per forward (images × pixels each) below which batching more MC passes together still
#: pays on CPUs; larger forwards outgrow the caches (at 128², 8 passes × 16 images in one forward
#: ran about 2x slower per image than 8 forwards of 16 images; benchmarks/README.md).
AUTO_PIXELS_PER_FORWARD = 16 * 128 * 128


_FOLDED: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, nn.Module]]" = weakref.WeakKeyDictionary()


def folded_prior(prior: nn.Module, channels_last: bool = False) -> nn.Module:
    """:func:`~anomorph.networks.blocks.fold_batch_norm` of ``prior``, its output layer (a
    transposed convolution to few channels) as a sub-pixel convolution
    (:func:`~anomorph.networks.blocks.sub_pixel_output_layers`), cached until any of its
    parameters or buffers changes (storage or in-place version), e.g. by training.
    ``channels_last``: the copy's 4-d weights are stored channels-last (oneDNN's native layout
    on CPUs; feed it channels-last inputs)."""
    tensors = [*prior.parameters(), *prior.buffers()]
    key = (tuple((t.data_ptr(), t._version, t.device.type) for t in tensors), bool(channels_last))
    cached = _FOLDED.get(prior)
    if cached is not None and cached[0] == key:
        return cached[1]
    from ..networks.blocks import fold_batch_norm, sub_pixel_output_layers

    folded = sub_pixel_output_layers(fold_batch_norm(prior))
    if channels_last:
        folded = folded.to(memory_format=torch.channels_last)
    _FOLDED[prior] = (key, folded)
    return folded


def use_channels_last(images: torch.Tensor) -> bool:
    """Whether MC dropout runs its passes channels-last: on CPU for 2-d images (``(B, C, H, W)``).
    oneDNN convolutions, above all the transposed ones, skip a layout conversion per layer
    (at 128², batch 16: a decoder pass about 20 % faster; benchmarks/README.md)."""
    return images.device.type == "cpu" and images.ndim == 4


def auto_max_batch(images: torch.Tensor) -> int:
    """Default ``max_batch`` of :class:`MCDropoutEstimator`: images per forward such that one forward
    holds about ``AUTO_PIXELS_PER_FORWARD`` pixels (at least the batch itself: one pass per forward).
    On CUDA all passes go in one forward."""
    if images.device.type == "cuda":
        return 1 << 30
    pixels = max(1, math.prod(images.shape[2:]))
    return max(images.shape[0], AUTO_PIXELS_PER_FORWARD // pixels)


class MCDropoutEstimator(UncertaintyEstimator):
    """Monte-Carlo dropout: N stochastic passes with the dropout layers on, as one forward.

    Options: ``passes`` N (default 16); ``target`` "prior" (std of x̂, intensity; default — the
    prior is computed before registration), "warped" (std of x̃, intensity) or "displacement"
    (√(Σ_k var d_k), pixels; MorphAEus only); ``dropout`` overrides every dropout layer's
    probability (None = as trained; 0 gives exactly zero variance); ``shared_masks`` (default
    True, see :class:`SeededDropout`); ``max_batch``: most images per forward (None = all N·B
    at once; default: :func:`auto_max_batch`, about 16 images of 128² per forward on CPU; the
    result does not change, only speed and memory); ``seed``; ``scale`` (default 0.02).

    The N passes run as pass-major (n·B) batches of up to ``max_batch`` images. When the encoder
    (and the dense ``to_latent`` layer) has no dropout — the case for anomorph's networks, where
    dropout sits in the decoder stages only — the encoder runs once on the B images and the code
    is repeated; the decoder layers before its first dropout layer (``from_latent`` and the first
    up-convolution and its normalisation) also run once, for all chunks
    (``AutoEncoder.decode_prefix``); only the dropout-bearing rest runs per pass
    (``AutoEncoder.decode_suffix``). Encoder and passes run on a copy of the prior with the
    BatchNorms folded into the convolutions (:func:`folded_prior`), channels-last on CPU
    (:func:`use_channels_last`): equal to the per-pass loop up to float rounding (≤ 1e-6,
    ``tests/test_uncertainty.py``). The deformation head is run only for ``target``
    "warped"/"displacement".
    Stochasticity reaches the head through x̂ and the decoder features (and through any dropout
    layer inside the head). Extras: ``mean``/``variance`` of x̂; with the head also
    ``warped_mean``/``warped_variance`` and ``displacement_mean``/``displacement_variance``
    (summed over components, pixels²).
    """

    name = "mc_dropout"
    units = "intensity (std of x̂ over MC passes)"
    default_scale = 0.02

    def __init__(self, passes: int = 16, target: str = "prior", dropout: float | None = None,
                 shared_masks: bool = True, max_batch: int | None = None, seed: int = 0,
                 scale: float | None = None) -> None:
        super().__init__(seed, scale)
        if int(passes) < 1:
            raise ConfigError(f"mc_dropout: passes must be >= 1, got {passes}")
        self.passes = int(passes)
        self.target = _check_target(self.name, target)
        self.dropout = dropout
        self.shared_masks = bool(shared_masks)
        self.max_batch = max_batch
        if self.target != "prior":
            self.units = "intensity (std of x̃)" if target == "warped" else "pixels (std of d)"

    def options(self) -> dict[str, Any]:
        return {**super().options(), "passes": self.passes, "target": self.target, "dropout": self.dropout,
                "shared_masks": self.shared_masks, "max_batch": self.max_batch}

    def estimate(self, network, images, generator):
        samples, n_layers = self._samples(network, images, draw_seed(generator))
        raw, extras = _sample_maps(self.name, samples, self.target)
        extras["n_dropout_layers"] = torch.tensor(n_layers)
        return raw, extras

    def samples(self, network: nn.Module, images: torch.Tensor, seed: int
                ) -> tuple[dict[str, torch.Tensor], int]:
        """The N passes themselves: ``({"reconstruction": (N, B, C, *spatial)[, "warped": …,
        "displacement": …]}, number of dropout layers)`` for the masks of ``seed`` (the seed
        :meth:`estimate` draws from its generator). Pass ``n`` equals a full forward of the
        network with :class:`SeededDropout` set to pass ``n`` (up to float rounding)."""
        with torch.no_grad(), eval_mode(network):
            return self._samples(network, images, seed)

    def _samples(self, network: nn.Module, images: torch.Tensor, seed: int
                 ) -> tuple[dict[str, torch.Tensor], int]:
        if self.target != "prior":
            _require_deformable(self.name, network, f"target={self.target!r}")
        sampler = SeededDropout(network, seed, self.dropout, self.shared_masks)
        if not sampler.active:
            why = ("dropout=0 was requested" if sampler.layers and self.dropout is not None
                   else f"{type(network).__name__} has no dropout layer (train with model.dropout > 0)")
            warnings.warn(f"mc_dropout: {why}; the MC variance is zero", stacklevel=4)
        prior = prior_network(network)
        batch = images.shape[0]
        encoder_parts = [getattr(prior, n, None) for n in ("encoder", "to_latent")]
        reuse_encoder = (hasattr(prior, "encode") and hasattr(prior, "decode") and None not in encoder_parts
                         and not any(dropout_layers(part) for part in encoder_parts))
        max_batch = auto_max_batch(images) if self.max_batch is None else int(self.max_batch)
        per_forward = max(1, max_batch // batch)
        chunks = [list(range(s, min(s + per_forward, self.passes))) for s in range(0, self.passes, per_forward)]
        need_head = self.target != "prior"
        collected: dict[str, list[torch.Tensor]] = {}
        if reuse_encoder:
            # the encoder and the passes run on a copy with the BatchNorms folded into the
            # convolutions (same function in eval mode up to float rounding; one elementwise pass
            # less per conv), channels-last on CPU (use_channels_last)
            channels_last = use_channels_last(images)
            fast = folded_prior(prior, channels_last)
            sampler.also_on(prior, fast)
        with sampler:
            if reuse_encoder:
                code = fast.encode(images.contiguous(memory_format=torch.channels_last) if channels_last
                                   else images)[0]
            # the layers before the first dropout layer run once for all chunks of passes
            prefix = fast.decode_prefix(code) if reuse_encoder and hasattr(fast, "decode_prefix") else None
            for chunk in chunks:
                sampler.passes = chunk
                n = len(chunk)
                if reuse_encoder:
                    decoded = (fast.decode_suffix(prefix, n) if prefix is not None
                               else fast.decode(_repeat(code, n)))
                    parts = {"reconstruction": decoded.image}
                    if need_head:
                        x = _repeat(images, n)
                        velocity = network.predict_velocity(x, decoded.image, decoded.features)
                        parts["warped"], _, parts["displacement"] = network.deform(decoded.image, velocity)
                else:
                    parts = _outputs(network, _repeat(images, n), self.target)
                for key, value in parts.items():
                    collected.setdefault(key, []).append(value.contiguous().reshape(n, batch, *value.shape[1:]))
        return {key: torch.cat(values) for key, values in collected.items()}, len(sampler.layers)


# ----------------------------------------------------------------------------- ensemble
class EnsembleEstimator(UncertaintyEstimator):
    """Deep ensemble: std over K independently seeded networks of one config.

    Options: ``members`` (networks) or ``run_dir`` (an ensemble directory written by
    ``anomorph fit --ensemble K`` / :func:`anomorph.training.fit_ensemble`; its members are
    loaded with ``which`` = "best" | "last"); ``target`` as for MC dropout; ``seed`` (unused:
    the ensemble is deterministic); ``scale`` (default 0.02).

    The ``network`` passed to ``__call__`` is the scored model (member 0 when evaluating an
    ensemble run); it is not added to the members, so the raw map is the population std of x̂
    over exactly the K members. Cost: K forward passes (one per member).
    """

    name = "ensemble"
    units = "intensity (std of x̂ over members)"
    default_scale = 0.02

    def __init__(self, members: Sequence[nn.Module] | None = None, run_dir: str | Path | None = None,
                 which: str = "best", target: str = "prior", seed: int = 0, scale: float | None = None) -> None:
        super().__init__(seed, scale)
        self.target = _check_target(self.name, target)
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.which = which
        if members is None and run_dir is None:
            raise ConfigError("ensemble: give members=[networks] or run_dir=ENSEMBLE_DIR "
                             "(trained with `anomorph fit --ensemble K`)")
        self._members = list(members) if members is not None else None

    @property
    def members(self) -> list[nn.Module]:
        if self._members is None:
            from ..runs import load_ensemble

            self._members = [network for network, _ in load_ensemble(self.run_dir, self.which)]
        return self._members

    def options(self) -> dict[str, Any]:
        return {**super().options(), "target": self.target, "run_dir": None if self.run_dir is None else str(self.run_dir),
                "which": self.which}

    def estimate(self, network, images, generator):
        members = self.members
        if len(members) < 2:
            raise ConfigError(f"ensemble: needs at least 2 members, got {len(members)}")
        if self.target != "prior":
            for member in members:
                _require_deformable(self.name, member, f"target={self.target!r}")
        collected: dict[str, list[torch.Tensor]] = {}
        for member in members:
            member.to(images.device)
            with eval_mode(member):
                parts = _outputs(member, images, self.target)
            for key, value in parts.items():
                collected.setdefault(key, []).append(value)
        samples = {key: torch.stack(values) for key, values in collected.items()}
        return _sample_maps(self.name, samples, self.target)


# ----------------------------------------------------------------------------- TTA
@dataclass(frozen=True)
class Augmentation:
    """An exactly invertible test-time augmentation of ``(B, C, *spatial)`` images in [0, 1].

    Forward: intensity ``gain · x^gamma`` (a bijection of [0, 1] onto [0, gain]), then a
    flip of the last spatial axis, then a circular integer shift by ``shift`` pixels per
    spatial axis (``torch.roll``; brain slices have an empty background margin, so only
    background wraps around). Inverse maps undo them in reverse order: the geometric part is
    exact bit for bit, the intensity part up to float rounding.
    """

    flip: bool = False
    shift: tuple[int, ...] = ()
    gamma: float = 1.0
    gain: float = 1.0

    @property
    def is_identity(self) -> bool:
        return not self.flip and not any(self.shift) and self.gamma == 1.0 and self.gain == 1.0

    def _dims(self, tensor: torch.Tensor) -> tuple[int, ...]:
        return tuple(range(2, tensor.ndim))

    def apply_geometry(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.flip:
            tensor = tensor.flip(-1)
        if any(self.shift):
            tensor = torch.roll(tensor, self.shift, self._dims(tensor))
        return tensor

    def invert_geometry(self, tensor: torch.Tensor) -> torch.Tensor:
        if any(self.shift):
            tensor = torch.roll(tensor, tuple(-s for s in self.shift), self._dims(tensor))
        if self.flip:
            tensor = tensor.flip(-1)
        return tensor

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Augment images (intensities clamped to [0, 1] first)."""
        x = images.clamp(0, 1)
        if self.gamma != 1.0:
            x = x.pow(self.gamma)
        if self.gain != 1.0:
            x = x * self.gain
        return self.apply_geometry(x)

    def invert(self, images: torch.Tensor) -> torch.Tensor:
        """Map an image predicted on the augmented input back to the input's grid and intensities."""
        x = self.invert_geometry(images)
        if self.gain != 1.0:
            x = x / self.gain
        if self.gamma != 1.0:
            x = x.clamp(0, 1).pow(1.0 / self.gamma)
        return x

    def invert_displacement(self, displacement: torch.Tensor) -> torch.Tensor:
        """Map a DDF (pixels, channel k along axis k) predicted on the augmented grid back."""
        d = self.invert_geometry(displacement)
        if self.flip:
            d = torch.cat([d[:, :-1], -d[:, -1:]], dim=1)
        return d


class TTAEstimator(UncertaintyEstimator):
    """Test-time augmentation: std over augmented predictions mapped back onto the input grid.

    Options: ``augmentations`` N (default 8, the first is the identity when
    ``include_identity``); ``flip`` (left-right flips, default True); ``max_shift`` (integer
    shifts in [−max_shift, max_shift] pixels per axis, default 2); ``gamma_range`` (log-uniform
    contrast exponent, default (0.85, 1.15)); ``gain_range`` (uniform intensity scale, default
    (0.9, 1.0) so augmented intensities stay in [0, 1]); ``target`` as for MC dropout;
    ``seed``; ``scale`` (default 0.02).

    The same N augmentations (drawn from the generator) are used for every image of the batch,
    and the N·B augmented images run as ONE forward. Implemented with exactly invertible torch
    ops (:class:`Augmentation`) rather than MONAI's ``TestTimeAugmentation``, which runs a
    dictionary transform pipeline one image at a time through a DataLoader, draws its
    parameters from its own NumPy random state and inverts with ``Invertd`` — it fits
    segmentation outputs, not batched, seeded, exactly inverted intensity predictions.
    """

    name = "tta"
    units = "intensity (std of x̂ over augmentations)"
    default_scale = 0.02

    def __init__(self, augmentations: int = 8, flip: bool = True, max_shift: int = 2,
                 gamma_range: Sequence[float] = (0.85, 1.15), gain_range: Sequence[float] = (0.9, 1.0),
                 include_identity: bool = True, target: str = "prior", seed: int = 0,
                 scale: float | None = None) -> None:
        super().__init__(seed, scale)
        if int(augmentations) < 1:
            raise ConfigError(f"tta: augmentations must be >= 1, got {augmentations}")
        if int(max_shift) < 0:
            raise ConfigError(f"tta: max_shift must be >= 0, got {max_shift}")
        gamma_range, gain_range = tuple(float(g) for g in gamma_range), tuple(float(g) for g in gain_range)
        if len(gamma_range) != 2 or not 0 < gamma_range[0] <= gamma_range[1]:
            raise ConfigError(f"tta: gamma_range must be (low, high) with 0 < low <= high, got {gamma_range}")
        if len(gain_range) != 2 or not 0 < gain_range[0] <= gain_range[1]:
            raise ConfigError(f"tta: gain_range must be (low, high) with 0 < low <= high, got {gain_range}")
        self.augmentations = int(augmentations)
        self.flip = bool(flip)
        self.max_shift = int(max_shift)
        self.gamma_range = gamma_range
        self.gain_range = gain_range
        self.include_identity = bool(include_identity)
        self.target = _check_target(self.name, target)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "augmentations": self.augmentations, "flip": self.flip,
                "max_shift": self.max_shift, "gamma_range": self.gamma_range, "gain_range": self.gain_range,
                "include_identity": self.include_identity, "target": self.target}

    def sample(self, generator: torch.Generator, spatial_dims: int = 2) -> list[Augmentation]:
        """The N augmentations for one call, drawn from ``generator``."""
        device = generator.device
        augmentations = []
        for index in range(self.augmentations):
            u = torch.rand(3, generator=generator, device=device).tolist()
            shift = torch.randint(-self.max_shift, self.max_shift + 1, (spatial_dims,), generator=generator,
                                  device=device).tolist()
            if index == 0 and self.include_identity:
                augmentations.append(Augmentation(False, (0,) * spatial_dims, 1.0, 1.0))
                continue
            log_low, log_high = math.log(self.gamma_range[0]), math.log(self.gamma_range[1])
            augmentations.append(Augmentation(
                flip=self.flip and u[0] < 0.5,
                shift=tuple(int(s) for s in shift),
                gamma=math.exp(log_low + (log_high - log_low) * u[1]),
                gain=self.gain_range[0] + (self.gain_range[1] - self.gain_range[0]) * u[2]))
        return augmentations

    def estimate(self, network, images, generator):
        if self.target != "prior":
            _require_deformable(self.name, network, f"target={self.target!r}")
        augmentations = self.sample(generator, images.ndim - 2)
        batch = images.shape[0]
        augmented = torch.cat([a.apply(images) for a in augmentations])
        parts = _outputs(network, augmented, self.target)
        samples: dict[str, torch.Tensor] = {}
        for key, value in parts.items():
            chunks = value.reshape(len(augmentations), batch, *value.shape[1:])
            invert = (lambda a, t: a.invert_displacement(t)) if key == "displacement" else (lambda a, t: a.invert(t))
            samples[key] = torch.stack([invert(a, chunk) for a, chunk in zip(augmentations, chunks)])
        return _sample_maps(self.name, samples, self.target)


# ----------------------------------------------------------------------------- aleatoric
class AleatoricEstimator(UncertaintyEstimator):
    """Heteroscedastic (aleatoric) head: the decoder's predicted std exp(½ log σ²), intensity.

    Needs a network built with ``heteroscedastic: true`` (trained with the Gaussian NLL, which
    the training module adds whenever the network predicts a log-variance). ``target``
    "prior" (default: σ on the prior's grid, before registration) or "warped" (σ ∘ φ, on the
    input's grid like x̃). ``scale`` default 0.05. Cost: one forward pass.
    """

    name = "aleatoric"
    units = "intensity (predicted std)"
    default_scale = 0.05

    def __init__(self, target: str = "prior", seed: int = 0, scale: float | None = None) -> None:
        super().__init__(seed, scale)
        if target not in ("prior", "warped"):
            raise ConfigError(f"aleatoric: target must be 'prior' or 'warped', got {target!r}")
        self.target = target

    def options(self) -> dict[str, Any]:
        return {**super().options(), "target": self.target}

    def estimate(self, network, images, generator):
        if not getattr(prior_network(network), "heteroscedastic", False):
            raise ConfigError(f"aleatoric: {type(network).__name__} has no log-variance head; train it with "
                             f"model.heteroscedastic=true (the Gaussian NLL is then added to the loss)")
        if self.target == "warped":
            _require_deformable(self.name, network, "target='warped'")
            out = network(images)
        else:
            out = prior_network(network)(images)
        if out.log_variance is None:
            raise ConfigError("aleatoric: the network returned no log_variance")
        std = channel_rms(torch.exp(0.5 * out.log_variance))
        raw = network.warp(std, out.displacement) if self.target == "warped" else std
        return raw, {"log_variance": out.log_variance, "reconstruction": out.reconstruction}


# ----------------------------------------------------------------------------- registration
class RegistrationEstimator(UncertaintyEstimator):
    """Forward–backward inconsistency of the deformation head, in pixels (MorphAEus only).

    The head is trained as ``head(target, moving, AE-decoder features of the target)`` with
    the moving image the AE's reconstruction of that target: in ``forward`` it reads
    (x, x̂ = AE(x), features of decode(encode(x))) and x̂ ∘ φ ≈ x.

    - forward: v_f = head(x, x̂, F(x)), registering x̂ onto x (the model's own registration);
    - backward: v_b = head(x̂, x, F(x̂)), registering x onto x̂: the pair is swapped *and* the
      decoder features are recomputed from the backward target, F(x̂) = the decoder features
      of decode(encode(x̂)), i.e. the AE run on x̂ exactly as ``forward`` runs it on its input.

    F(·) are the features of the AE applied to the head's first ("input"/target) argument, so
    this is the same head applied to the opposite direction with inputs that correspond to it.
    Reusing F(x) in the backward pass (an earlier version) fed the head features describing
    the forward target while asking for the reverse registration, so v_b was not a backward
    registration. Caveat: the head was only trained on (x, AE(x)) pairs, and in the backward
    pair the moving image x is not AE(x̂); the inconsistency therefore measures both
    registration ambiguity and how far (x̂, x) lies from the training pairs; read it as a
    consistency check of the head, not as a pure registration error.
    With ``head_inputs="pair"`` the head reads no features and only the swap matters.

    d_f = exp(v_f) − id, d_b = exp(v_b) − id (pixels). For consistent registrations
    φ_b ∘ φ_f = id, so the raw map is ``‖d_f(p) + d_b(p + d_f(p))‖₂`` in **pixels**,
    ``(B, 1, *spatial)``, ≥ 0 (composition with the network's integration warp). Needs a
    head that reads the image pair (``head_inputs`` "pair" or "both"). ``scale`` default 0.5
    pixels. Cost: two prior passes (one with a pair-only head), two head passes and two
    integrations. Extras: ``displacement_forward``, ``displacement_backward``,
    ``reconstruction`` (x̂).
    """

    name = "registration"
    units = "pixels (forward-backward inconsistency)"
    default_scale = 0.5

    def estimate(self, network, images, generator):
        _require_deformable(self.name, network, "registration inconsistency")
        if not getattr(network.velocity_head, "use_pair", True):
            raise ConfigError("registration: the deformation head reads decoder features only "
                             "(head_inputs='features'); swapping x and x̂ needs head_inputs 'pair' or 'both'")
        prior = network.prior
        decoded = prior.decode(prior.encode(images)[0])  # x̂ and F(x)
        velocity_forward = network.predict_velocity(images, decoded.image, decoded.features)
        if getattr(network, "head_feature_levels", 1):
            backward_features = prior.decode(prior.encode(decoded.image)[0]).features  # F(x̂)
        else:  # a pair-only head reads no decoder features
            backward_features = []
        velocity_backward = network.predict_velocity(decoded.image, images, backward_features)
        forward = network.integrate(velocity_forward)
        backward = network.integrate(velocity_backward)
        residual = forward + network.integrator.warp_layer(backward, forward)
        raw = residual.norm(dim=1, keepdim=True)
        return raw, {"displacement_forward": forward, "displacement_backward": backward,
                     "reconstruction": decoded.image}


# ----------------------------------------------------------------------------- residual_z
class ResidualZEstimator(UncertaintyEstimator):
    """The prior residual |x − x̂|, computed before registration (independent of φ).

    With a heteroscedastic network and ``use_variance`` (default True) it is divided by the
    predicted std: |x − x̂| / σ (dimensionless). Meant to be z-scored with
    :class:`~anomorph.uncertainty.normalise.HealthyNormaliser`: a strong practical baseline.
    ``scale`` default 0.1 (intensity) or 2.0 (÷σ). Cost: one prior pass (no head).
    """

    name = "residual_z"
    units = "intensity (|x − x̂|), or σ units with a heteroscedastic head"
    default_scale = 0.1

    def __init__(self, use_variance: bool = True, seed: int = 0, scale: float | None = None) -> None:
        super().__init__(seed, scale)
        self.use_variance = bool(use_variance)
        self._scale_given = scale is not None

    def options(self) -> dict[str, Any]:
        return {**super().options(), "use_variance": self.use_variance}

    def scale_for(self, network: nn.Module) -> float:
        if not self._scale_given and self.use_variance and getattr(prior_network(network), "heteroscedastic", False):
            return 2.0
        return self.scale

    def estimate(self, network, images, generator):
        out = prior_network(network)(images)
        residual = (images - out.reconstruction).abs()
        if self.use_variance and out.log_variance is not None:
            residual = residual * torch.exp(-0.5 * out.log_variance)
        return channel_rms(residual), {"reconstruction": out.reconstruction}


class DeformationAtypicalityEstimator(UncertaintyEstimator):
    """Where the unguided φ does something healthy brains do not need (MorphAEus only).

    Registering a lesion away needs local shrinkage or growth and displacements that normal
    variability does not: the raw map is ``|log det Jφ|`` (``quantity="log_jacobian"``,
    dimensionless; det J clamped at 1e-3, one-sided folds count as large) or ``‖d‖``
    (``quantity="displacement"``, pixels) of the network's own, unguided registration. It is
    meant to be z-scored per pixel against healthy slices (the slices are roughly aligned, so
    "the same location" is the same model-grid pixel): high z = a deformation that is atypical
    *there*. Depends on φ: inference only (see the module docstring). Cost: one full pass.
    ``scale`` default 0.2 (log det) or 1.0 (pixels).
    """

    name = "deformation"
    units = "|log det Jφ| (dimensionless) or ‖d‖ (pixels)"
    default_scale = 0.2
    QUANTITIES = ("log_jacobian", "displacement")

    def __init__(self, quantity: str = "log_jacobian", seed: int = 0, scale: float | None = None) -> None:
        if quantity not in self.QUANTITIES:
            raise ConfigError(f"deformation: quantity must be one of {self.QUANTITIES}, got {quantity!r}")
        super().__init__(seed, scale if scale is not None else (0.2 if quantity == "log_jacobian" else 1.0))
        self.quantity = quantity

    def options(self) -> dict[str, Any]:
        return {**super().options(), "quantity": self.quantity}

    def estimate(self, network, images, generator):
        from ..networks import jacobian_determinant

        _require_deformable(self.name, network, "deformation atypicality")
        out = network(images)
        if self.quantity == "log_jacobian":
            raw = torch.log(jacobian_determinant(out.displacement).clamp_min(1e-3)).abs()
        else:
            raw = out.displacement.norm(dim=1, keepdim=True)
        return raw, {"reconstruction": out.reconstruction, "displacement": out.displacement, "velocity": out.velocity}


class WarpedResidualEstimator(UncertaintyEstimator):
    """|x − x̃| of the *unguided* registration, in intensity units: the post-registration
    residual, best z-scored per tissue class (``HealthyNormaliser(mode="tissue")``). Depends
    on φ: inference only, and used by the iterative strategy's later rounds. Cost: one full pass."""

    name = "warped_residual"
    units = "intensity"
    default_scale = 0.1

    def estimate(self, network, images, generator):
        _require_deformable(self.name, network, "the registered residual")
        out = network(images)
        return channel_rms((images - out.warped).abs()), {"reconstruction": out.reconstruction,
                                                          "velocity": out.velocity}


class NonCorrespondenceEstimator(UncertaintyEstimator):
    """A learned head's belief that a pixel of x has no healthy counterpart (MorphAEus only).

    The head (:class:`~anomorph.networks.NonCorrespondenceNet`, trained by ``anomorph fit-head``
    on healthy training slices with synthetic anomalies) reads (x, x̂, x̃) of the unguided
    pass and outputs a logit ℓ; the raw map is −log(1 − p) = softplus(ℓ), p = sigmoid(ℓ): ≥ 0,
    ≈ 0 where the head is sure the tissue corresponds, ≈ ℓ where it is sure it does not.
    Options: ``run_dir`` (the run whose ``noncorrespondence/`` folder holds the head) or
    ``head`` (a network). Depends on φ through x̃: inference only. Cost: one full pass + the
    head. ``scale`` default 1 nat (p = 0.63 → u = 0.63).
    """

    name = "noncorrespondence"
    units = "nats: −log(1 − p)"
    default_scale = 1.0

    def __init__(self, run_dir: str | Path | None = None, head: nn.Module | None = None, seed: int = 0,
                 scale: float | None = None) -> None:
        super().__init__(seed, scale)
        if head is None and run_dir is None:
            raise ConfigError("noncorrespondence: give run_dir=RUN (with a head trained by "
                             "`anomorph fit-head --run RUN`) or head=network")
        self.run_dir = None if run_dir is None else Path(run_dir)
        self._head = head

    @property
    def head(self) -> nn.Module:
        if self._head is None:
            from ..runs import load_head

            self._head = load_head(self.run_dir)[0]
        return self._head

    def options(self) -> dict[str, Any]:
        return {**super().options(), "run_dir": None if self.run_dir is None else str(self.run_dir)}

    def estimate(self, network, images, generator):
        _require_deformable(self.name, network, "the non-correspondence head")
        head = self.head.to(images.device)
        out = network(images)
        with eval_mode(head):
            logits = head(images, out.reconstruction, out.warped)
        return torch.nn.functional.softplus(logits), {"reconstruction": out.reconstruction,
                                                      "probability": torch.sigmoid(logits),
                                                      "velocity": out.velocity}


class FieldDisagreementEstimator(UncertaintyEstimator):
    """Where the unguided field does what a field trained not to follow anomalies refuses to do.

    The raw map is ‖d − d_tied‖ (pixels): the displacement of the scored network's own unguided
    registration against that of a *tied* network — a copy of it whose velocity head was
    fine-tuned, prior frozen, to give slices with synthetic anomalies the clean slice's field
    (``train.finetune_from_teacher`` with the scored run as ``consistency_teacher_run``,
    configs/morphaeus_distilled.yaml). Both register the same x̂ to the same x; on healthy tissue
    they agree, where the unguided field follows an anomaly the tied one does not. A u that does
    not come from an intensity residual. With a tied network that does not share the scored
    network's prior, the map also holds the difference of the two priors' registrations. Options:
    ``tied_run`` (the tied run's directory) or ``tied`` (a network). Depends on φ: inference
    only. Cost: two full passes. ``scale`` default 0.5 pixel.
    """

    name = "field_disagreement"
    units = "pixels"
    default_scale = 0.5

    def __init__(self, tied_run: str | Path | None = None, tied: nn.Module | None = None, seed: int = 0,
                 scale: float | None = None) -> None:
        super().__init__(seed, scale)
        if tied is None and tied_run is None:
            raise ConfigError("field_disagreement: give tied_run=RUN (a run fine-tuned with "
                              "train.finetune_from_teacher from the scored run) or tied=network")
        self.tied_run = None if tied_run is None else Path(tied_run)
        self._tied = tied

    @property
    def tied(self) -> nn.Module:
        if self._tied is None:
            from ..runs import load_run

            self._tied = load_run(self.tied_run)[0]
        return self._tied

    def options(self) -> dict[str, Any]:
        return {**super().options(), "tied_run": None if self.tied_run is None else str(self.tied_run)}

    def estimate(self, network, images, generator):
        _require_deformable(self.name, network, "a field to compare")
        tied = self.tied.to(images.device)
        _require_deformable(self.name, tied, "the tied field")
        out = network(images)
        with eval_mode(tied):
            tied_displacement = tied(images).displacement
        raw = (out.displacement - tied_displacement).norm(dim=1, keepdim=True)
        return raw, {"reconstruction": out.reconstruction, "velocity": out.velocity,
                     "tied_displacement": tied_displacement}


# ----------------------------------------------------------------------------- factory
ESTIMATORS: dict[str, type[UncertaintyEstimator]] = {
    "mc_dropout": MCDropoutEstimator,
    "ensemble": EnsembleEstimator,
    "tta": TTAEstimator,
    "aleatoric": AleatoricEstimator,
    "registration": RegistrationEstimator,
    "residual_z": ResidualZEstimator,
    "deformation": DeformationAtypicalityEstimator,
    "warped_residual": WarpedResidualEstimator,
    "noncorrespondence": NonCorrespondenceEstimator,
    "field_disagreement": FieldDisagreementEstimator,
}


#: options a combination ``RULE(a,b)`` accepts; ``seed`` and ``run_dir`` are passed on to the parts
COMBINATION_OPTIONS = ("seed", "scale", "run_dir")


def estimator_options(name: str) -> tuple[str, ...]:
    """Keyword options accepted by estimator ``name``."""
    if parse_combination(name) is not None:
        return COMBINATION_OPTIONS
    if name not in ESTIMATORS:
        raise ConfigError(f"unknown uncertainty estimator {name!r}; expected one of {sorted(ESTIMATORS)}")
    parameters = inspect.signature(ESTIMATORS[name].__init__).parameters
    return tuple(p for p in parameters if p != "self")


def build_estimator(name: str, **options: Any) -> UncertaintyEstimator:
    """An estimator by name (``mc_dropout``, ``ensemble``, ``tta``, ``aleatoric``,
    ``registration``, ``residual_z``, ``deformation``, ``warped_residual``,
    ``noncorrespondence``, ``field_disagreement``, or a combination ``max|mean|min(NAME,NAME,...)`` of them) with its
    keyword options; unknown options are an error that lists the accepted ones. A combination's
    parts get their default options, plus ``seed`` and ``run_dir`` where they accept them."""
    combination = parse_combination(name)
    if combination is not None:
        rule, parts = combination
        unknown = sorted(set(options) - set(COMBINATION_OPTIONS))
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown} for uncertainty estimator {name!r}; "
                             f"accepted: {sorted(COMBINATION_OPTIONS)}")
        passed = {key: options[key] for key in ("seed", "run_dir") if options.get(key) is not None}
        built = [build_estimator(part, **{k: v for k, v in passed.items() if k in estimator_options(part)})
                 for part in parts]
        return CombinedEstimator(built, rule, seed=options.get("seed", 0), scale=options.get("scale"))
    accepted = estimator_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for uncertainty estimator {name!r}; "
                         f"accepted: {sorted(accepted)}")
    try:
        return ESTIMATORS[name](**options)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # e.g. passes=abc: int("abc")
        raise ConfigError(f"uncertainty estimator {name!r}: bad option value(s) {options}: {err}") from err
