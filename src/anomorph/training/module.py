"""Lightning wrapper around the plain ``torch.nn.Module`` networks (kept separate, as anomalib
does): losses and their schedule (SPEC §3), optimisation, logging, validation figures."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..config import RunConfig, config_from_dict
from ..data.types import SliceBatch
from ..errors import AnomorphError, ConfigError, NonFiniteLossError
from ..guidance.masks import paste_intensity, synthetic_anomaly_masks, synthetic_corruption
from ..guidance.priors import log_jacobian_anchor
from ..networks import ModelOutput, build_network
from .. import losses
from ..runs import load_run, network_options  # noqa: F401  (network_options re-exported)


class AwareForward(NamedTuple):
    """What :meth:`AnomalyModule.anomaly_aware_forward` returns (see there)."""

    output: ModelOutput
    mask: torch.Tensor
    corrupted: torch.Tensor
    clean: ModelOutput | None
    teacher_displacement: torch.Tensor | None = None


def is_deformable(config: RunConfig) -> bool:
    return config.model.name == "morphaeus"


class AnomalyModule(L.LightningModule):
    """Trains an AE, VAE or deformable AE.

    Loss = MSE(x, x̂) + ``ssim_weight``·(1 − SSIM(x, x̂)) [+ ``kl_weight``·KL for the VAE]
    [+ after ``warmup_epochs``: ``ncc_weight``·NCC-loss(x, x̃) + β·‖∇v‖² for the deformable AE,
    β ramped linearly from ``beta_start`` to ``beta_end`` over ``beta_ramp_epochs``; with synthetic
    masks m (conditioned head, ``train.synthetic_anomalies``) the NCC is masked by 1 − m, β is
    weighted by 1 + α·m and a local anchor is added; with ``train.field_consistency_weight`` the
    clean slice's field is trained too and the corrupted slice's field is tied to it, or to a
    teacher's clean field (``train.consistency_teacher_decay``: a mean teacher;
    ``train.consistency_teacher_run``: a frozen trained run), see :meth:`compute_losses`].
    ``val/loss`` uses the *final* weights (β = ``beta_end``, registration on) at every epoch, so
    epochs are comparable and the best checkpoint is chosen on a fixed objective.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters({"config": config})
        self.run_config = config_from_dict(config)
        self.network = build_network(network_options(self.run_config))
        self.consistency_teacher = self._build_teacher()
        if self.run_config.train.finetune_from_teacher:  # start from the teacher, train the velocity head only
            try:
                self.network.load_state_dict(self.consistency_teacher.state_dict())
            except RuntimeError as err:
                raise ConfigError(f"train.finetune_from_teacher: the network of model.options does not match the "
                                  f"teacher run {self.run_config.train.consistency_teacher_run}: "
                                  f"{str(err).splitlines()[0]}") from None
            self.network.prior.requires_grad_(False)
        self.figure_dir: Path | None = None
        # (epoch, images, output) of the latest validation's first batch, and the last epoch drawn
        self._figure_sample: tuple[int, torch.Tensor, ModelOutput] | None = None
        self._figure_written: int | None = None
        self._layout = torch.contiguous_format  # set by on_fit_start (memory_format)

    def _build_teacher(self) -> torch.nn.Module | None:
        """The teacher of field-consistency training, never trained by the loss: a mean teacher
        (``train.consistency_teacher_decay``: an EMA of the network's weights and buffers) or a
        frozen trained run (``train.consistency_teacher_run``); None without either. Its state
        is in the checkpoint (a resumed run continues the average) but not in what ``load_run``
        reads (the "network." keys)."""
        t = self.run_config.train
        if t.consistency_teacher_decay is not None:
            return AveragedModel(self.network, multi_avg_fn=get_ema_multi_avg_fn(t.consistency_teacher_decay),
                                 use_buffers=True).requires_grad_(False)
        if t.consistency_teacher_run is None:
            return None
        try:
            teacher, teacher_config = load_run(t.consistency_teacher_run)
        except AnomorphError as err:
            raise ConfigError(f"train.consistency_teacher_run: {err}") from None
        if teacher_config.model.name != "morphaeus" or teacher_config.data.size != self.run_config.data.size:
            raise ConfigError(f"train.consistency_teacher_run: {t.consistency_teacher_run} is a "
                              f"{teacher_config.model.name!r} run at data.size {teacher_config.data.size}; the "
                              f"teacher must be a deformable (morphaeus) run at data.size {self.run_config.data.size}")
        # its mode is set at each use (eval, in teacher_displacement); train() here only keeps
        # Lightning's start-of-fit check from warning about modules left in eval mode
        return teacher.requires_grad_(False).train()

    # ------------------------------------------------------------------ loss
    def registration_weight(self, epoch: int) -> float | None:
        """β for ``epoch``, or None while the registration terms are still off (warm-up)."""
        t = self.run_config.train
        return losses.beta_schedule(epoch, t.warmup_epochs, t.beta_ramp_epochs, t.beta_start, t.beta_end)

    def compute_losses(self, x: torch.Tensor, out: ModelOutput, beta: float | None,
                       guidance: torch.Tensor | None = None,
                       registration_target: torch.Tensor | None = None,
                       clean_branch: ModelOutput | None = None,
                       consistency_target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Loss terms and their total (``loss``). ``guidance`` m ``(B, 1, H, W)`` switches on the
        spatially weighted prior (conditioned-head training); ``registration_target`` is the image
        x̃ is registered to (default ``x``; the head's input with pasted fake anomalies);
        ``clean_branch`` (field-consistency training): the same network registering x̂ to the clean
        x; its NCC to x and smoothness are averaged with those of ``out`` (so the registration
        terms keep the weight they have for a single field), and
        ``train.field_consistency_weight``·mean over pixels of ‖d − d_clean‖² (pixels²) ties the
        two fields, with gradient into both. ``consistency_target`` (a teacher's tie, needs
        ``clean_branch``): the displacement ``(B, D, H, W)`` in pixels the corrupted field is tied
        to instead of the clean branch's, without gradient.

        Always computed in float32, outside any autocast region: under ``train.precision:
        bf16-mixed`` the network's outputs arrive in bfloat16, whose 8-bit mantissa cannot hold
        the window sums and variances of the local NCC and SSIM (they came out as −3·10⁶ and inf)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._compute_losses(x.float(), out.float(), beta,
                                        None if guidance is None else guidance.float(),
                                        None if registration_target is None else registration_target.float(),
                                        None if clean_branch is None else clean_branch.float(),
                                        None if consistency_target is None else consistency_target.float())

    def _compute_losses(self, x: torch.Tensor, out: ModelOutput, beta: float | None,
                        guidance: torch.Tensor | None, registration_target: torch.Tensor | None,
                        clean_branch: ModelOutput | None,
                        consistency_target: torch.Tensor | None) -> dict[str, torch.Tensor]:
        t = self.run_config.train
        g = self.run_config.guidance
        target = x if registration_target is None else registration_target
        terms: dict[str, torch.Tensor] = {}
        terms["mse"] = torch.mean((out.reconstruction - x) ** 2)
        terms["ssim"] = losses.ssim_loss(out.reconstruction, x)
        total = terms["mse"] + t.ssim_weight * terms["ssim"]
        if out.mu is not None and out.logvar is not None:
            terms["kl"] = losses.kl_divergence(out.mu, out.logvar)
            total = total + t.kl_weight * terms["kl"]
        if out.log_variance is not None:
            terms["nll"] = losses.gaussian_nll(x, out.reconstruction, out.log_variance)
            total = total + terms["nll"]
        if out.velocity is not None and beta is not None:
            keep = None if guidance is None else 1.0 - guidance
            stiffness = None if guidance is None else 1.0 + g.alpha * guidance
            terms["ncc"] = (losses.local_ncc_loss(out.warped, target, kernel_size=t.ncc_window) if keep is None
                            else losses.masked_local_ncc_loss(out.warped, target, keep, kernel_size=t.ncc_window))
            terms["smooth"] = losses.velocity_smoothness(out.velocity, weight=stiffness)
            ncc, smooth = terms["ncc"], terms["smooth"]
            if clean_branch is not None:
                terms["ncc_clean"] = losses.local_ncc_loss(clean_branch.warped, x, kernel_size=t.ncc_window)
                terms["smooth_clean"] = losses.velocity_smoothness(clean_branch.velocity)
                tied_to = clean_branch.displacement if consistency_target is None else consistency_target.detach()
                terms["consistency"] = losses.displacement_consistency(out.displacement, tied_to)
                ncc, smooth = (ncc + terms["ncc_clean"]) / 2, (smooth + terms["smooth_clean"]) / 2
                total = total + t.field_consistency_weight * terms["consistency"]
            total = total + t.ncc_weight * ncc + beta * smooth
            if guidance is not None:
                terms["anchor"] = log_jacobian_anchor(out.displacement, guidance, g.gamma)
                total = total + g.anchor_weight * terms["anchor"]
            if t.bidirectional:
                terms["ncc_inverse"] = losses.local_ncc_loss(
                    self.network.warp_inverse(x, out.velocity), out.reconstruction.detach(), kernel_size=t.ncc_window)
                total = total + t.ncc_weight * terms["ncc_inverse"]
        terms["loss"] = total
        return terms

    # ------------------------------------------------------------------ steps
    def forward(self, x: torch.Tensor, **kwargs: Any) -> ModelOutput:
        return self.network(x, **kwargs)

    def _step_generator(self) -> torch.Generator:
        """The generator of the synthetic masks of this training step, seeded by (seed, global
        step), so a resumed run draws the same masks."""
        return torch.Generator().manual_seed(self.run_config.seed * 1_000_003 + int(self.global_step))

    def split_forward(self, clean: torch.Tensor, field_input: torch.Tensor,
                      guidance: torch.Tensor | None = None) -> ModelOutput:
        """The deformable AE's forward with the prior x̂ encoded from ``clean`` (it must stay
        pseudo-healthy) and the velocity predicted from ``field_input`` (an image with synthetic
        anomalies) and, for the conditioned head, the mask ``guidance``."""
        return self._split_forward(clean, field_input, guidance, clean_field=False)[0]

    def _split_forward(self, clean: torch.Tensor, field_input: torch.Tensor, guidance: torch.Tensor | None,
                       clean_field: bool) -> tuple[ModelOutput, ModelOutput | None]:
        """:meth:`split_forward`, and with ``clean_field`` also the same network's registration of
        x̂ to the *clean* slice (warped, velocity, displacement; reconstruction and latents shared),
        computed in the same batched call of the velocity head and kept in the graph: the field
        the field-consistency term ties the corrupted slice's field to."""
        net = self.network
        z, mu, logvar = net.prior.encode(clean)
        decoded = net.prior.decode(z)
        prior = decoded.image.detach() if net.detach_prior else decoded.image
        clean_output = None
        if clean_field:
            velocity = net.predict_velocity(torch.cat([field_input, clean]), torch.cat([decoded.image] * 2),
                                            [torch.cat([f, f]) for f in decoded.features],
                                            guidance=None if guidance is None else torch.cat([guidance] * 2))
            warped, velocity, displacement = net.deform(torch.cat([prior, prior]), velocity)
            (warped, warped_clean), (velocity, velocity_clean), (displacement, displacement_clean) = (
                warped.chunk(2), velocity.chunk(2), displacement.chunk(2))
            clean_output = ModelOutput(decoded.image, warped_clean, velocity_clean, displacement_clean, mu, logvar,
                                       decoded.log_variance, z)
        else:
            velocity = net.predict_velocity(field_input, decoded.image, decoded.features, guidance=guidance)
            warped, velocity, displacement = net.deform(prior, velocity)
        output = ModelOutput(decoded.image, warped, velocity, displacement, mu, logvar, decoded.log_variance, z)
        return output, clean_output

    def conditioned_forward(self, x: torch.Tensor, brain_mask: torch.Tensor
                            ) -> tuple[ModelOutput, torch.Tensor, torch.Tensor]:
        """Training forward of the conditioned head: synthetic masks m and fake anomalies.

        The prior x̂ is computed from the clean x; the head reads (x with pasted anomalies inside
        m, x̂, m). Returns (output, m, head input).
        """
        g = self.run_config.guidance
        generator = self._step_generator()
        m = synthetic_anomaly_masks(tuple(x.shape), generator, brain_mask,
                                    empty_probability=1.0 - g.mask_probability)
        x_head = paste_intensity(x, m, generator, g.paste_probability)
        return self.split_forward(x, x_head, guidance=m), m, x_head

    def anomaly_aware_forward(self, x: torch.Tensor, brain_mask: torch.Tensor,
                              registration: bool = True) -> AwareForward:
        """Training forward of ``train.synthetic_anomalies``: x with synthetic anomalies
        (:func:`~anomorph.guidance.masks.synthetic_corruption`; a share 1 − mask_probability of
        the slices left clean) goes to the field; x̂ is computed from the clean x. Returns
        (output, m, corrupted x, clean output), m ``(B, 1, H, W)`` ∈ {0, 1} the pixels the
        corruption changed; the clean output (the same network registering x̂ to the clean x, in
        the graph) only when ``train.field_consistency_weight`` is set, else None; with
        a teacher (``train.consistency_teacher_decay`` or ``_run``) also its displacement of the clean x
        (eval mode, no gradient), else None — and None while ``registration`` is False (the warm-up,
        when the tie is off: the teacher's pass would be wasted)."""
        g, t = self.run_config.guidance, self.run_config.train
        corrupted, m = synthetic_corruption(x, self._step_generator(), brain_mask, t.synthetic_max_blobs,
                                            tuple(t.synthetic_radius_range), empty_probability=1.0 - g.mask_probability)
        out, clean = self._split_forward(x, corrupted, None, clean_field=t.field_consistency_weight is not None)
        return AwareForward(out, m, corrupted, clean, self.teacher_displacement(x) if registration else None)

    def teacher_displacement(self, x: torch.Tensor) -> torch.Tensor | None:
        """The teacher's displacement ``(B, D, H, W)`` (pixels) of ``x``: its own prior and field,
        in eval mode (no dropout, running batch-norm statistics), without gradient; None without
        a teacher."""
        if self.consistency_teacher is None:
            return None
        teacher = self.consistency_teacher
        teacher = (teacher.module if isinstance(teacher, AveragedModel) else teacher).eval()  # train() reaches it
        with torch.no_grad():
            return teacher(x).displacement

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Move a mean teacher one EMA step towards the network (after the optimiser's step); a
        frozen teacher stays as it is."""
        if isinstance(self.consistency_teacher, AveragedModel):
            self.consistency_teacher.update_parameters(self.network)

    def training_step(self, batch: SliceBatch, batch_idx: int) -> torch.Tensor:
        batch = self.in_layout(batch)
        if self.run_config.train.finetune_from_teacher:
            self.network.prior.eval()  # frozen prior: x̂ stays the teacher's (no dropout, no batch-norm updates)
        beta = self.registration_weight(self.current_epoch)
        if self.run_config.guidance.strategy == "conditioned":
            out, m, x_head = self.conditioned_forward(batch.image, batch.brain_mask)
            terms = self.compute_losses(batch.image, out, beta, guidance=m, registration_target=x_head)
        elif self.run_config.train.synthetic_anomalies:
            out, m, corrupted, clean, teacher = self.anomaly_aware_forward(batch.image, batch.brain_mask,
                                                                           registration=beta is not None)
            held = m if self.run_config.train.synthetic_anomaly_mask else None
            terms = self.compute_losses(batch.image, out, beta, guidance=held, registration_target=corrupted,
                                        clean_branch=clean, consistency_target=teacher)
        else:
            out = self.network(batch.image)
            terms = self.compute_losses(batch.image, out, beta)
        if not torch.isfinite(terms["loss"]):
            raise NonFiniteLossError(
                f"non-finite training loss at epoch {self.current_epoch}, global step {self.global_step} "
                f"(terms: { {k: float(v.detach()) for k, v in terms.items()} }); the last good checkpoint is "
                f"{self.last_checkpoint_hint()}")
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, prog_bar=False, on_step=True,
                      on_epoch=True, batch_size=len(batch))
        self.log("train/beta", float(beta or 0.0), on_step=False, on_epoch=True, batch_size=len(batch))
        self.log("loss", terms["loss"], prog_bar=True, on_step=True, on_epoch=False, logger=False)
        return terms["loss"]

    def validation_step(self, batch: SliceBatch, batch_idx: int) -> None:
        t = self.run_config.train
        batch = self.in_layout(batch)
        out = self.network(batch.image)
        terms = self.compute_losses(batch.image, out, t.beta_end if is_deformable(self.run_config) else None)
        brain = batch.brain_mask
        residual = (batch.image - out.warped).abs() * brain
        terms["residual"] = residual.sum() / brain.sum().clamp_min(1.0)
        prior = (batch.image - out.reconstruction).abs() * brain
        terms["residual_prior"] = prior.sum() / brain.sum().clamp_min(1.0)
        self.log_dict({f"val/{k}": v for k, v in terms.items()}, prog_bar=False, on_epoch=True,
                      batch_size=len(batch), sync_dist=True)
        self.log("val_loss", terms["loss"], prog_bar=True, on_epoch=True, logger=False, batch_size=len(batch),
                 sync_dist=True)
        if batch_idx == 0 and self.figure_dir is not None and self.trainer.is_global_zero \
                and not self.trainer.sanity_checking:
            self._figure_sample = (self.current_epoch, batch.image, out)
            if self._figure_due(self.current_epoch):
                self._write_figure()

    def _figure_due(self, epoch: int) -> bool:
        """Whether epoch ``epoch``'s validation figure is written at once: the first figure, every
        ``figure_every_n_epochs``-th epoch and the last epoch of ``max_epochs``. The last validated
        epoch of a run that stops earlier (early stopping, ``max_steps``) is written at the end."""
        every = self.run_config.train.figure_every_n_epochs
        return self._figure_written is None or epoch % every == 0 or epoch == self.trainer.max_epochs - 1

    def _write_figure(self) -> None:
        from ..reporting.figures import save_reconstruction_grid

        epoch, image, out = self._figure_sample
        save_reconstruction_grid(image, out, self.figure_dir / f"val_epoch{epoch:03d}.png",
                                 title=f"{self.run_config.name}: validation epoch {epoch}")
        self._figure_written = epoch

    def on_train_end(self) -> None:
        """Write the last validated epoch's figure if its epoch was not due (see _figure_due)."""
        if self._figure_sample is not None and self._figure_written != self._figure_sample[0]:
            self._write_figure()

    def last_checkpoint_hint(self) -> str:
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return "(none)"
        for cb in trainer.checkpoint_callbacks:
            if getattr(cb, "last_model_path", ""):
                return cb.last_model_path
        return "(none yet)"

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the CPU RNG state (dropout) so a resumed run continues bit-identically on CPU."""
        checkpoint["anomorph_cpu_rng_state"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("anomorph_cpu_rng_state")
        if isinstance(state, torch.Tensor):
            torch.set_rng_state(state)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam with the fused update (one pass over each parameter's weight, gradient and moments;
        PyTorch's default is a per-parameter loop on CPU) where PyTorch has it — parameters on CPU
        or CUDA — else the multi-tensor (``foreach``) update. The same arithmetic up to float
        rounding; ``benchmarks/throughput.py --train-variants`` compares the two in a whole
        training step."""
        t = self.run_config.train
        params = [p for p in self.network.parameters() if p.requires_grad]  # all but a frozen prior
        fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        flag = {"fused": True} if fused else {"foreach": True}
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay, **flag)

    # ------------------------------------------------------------------ memory layout
    def memory_format(self, device: torch.device) -> torch.memory_format:
        """The layout training uses on ``device``: ``torch.channels_last`` for a 2-d network on
        CPU when ``train.channels_last`` (see :class:`anomorph.config.TrainConfig`), otherwise
        ``torch.contiguous_format``."""
        if (self.run_config.train.channels_last and torch.device(device).type == "cpu"
                and getattr(self.network, "spatial_dims", 2) == 2):
            return torch.channels_last
        return torch.contiguous_format

    def apply_memory_format(self, device: torch.device) -> torch.memory_format:
        """Store the network's parameters in :meth:`memory_format` (``device``); returns it."""
        layout = self.memory_format(device)
        self.network.to(memory_format=layout)
        if self.consistency_teacher is not None:
            self.consistency_teacher.to(memory_format=layout)
        return layout

    def on_fit_start(self) -> None:
        self._layout = self.apply_memory_format(self.device)

    def in_layout(self, batch: SliceBatch) -> SliceBatch:
        """``batch`` with its images in the layout set by :meth:`on_fit_start` (a 1-channel NCHW
        tensor already counts as channels-last, so this only copies multi-channel inputs)."""
        if self._layout is not torch.contiguous_format and batch.image.ndim == 4:
            batch = dataclasses.replace(batch, image=batch.image.contiguous(memory_format=self._layout))
        return batch

