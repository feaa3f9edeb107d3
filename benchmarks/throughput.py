"""Training and inference throughput of the shipped anomorph models (SPEC §5).

For each model (``ae``, ``vae``, ``morphaeus``, built from ``configs/<model>.yaml`` with the
image size set to the benchmark size) and each size, measures:

- training images/s: one step = forward + the real training loss
  (:meth:`anomorph.training.module.AnomalyModule.compute_losses`, registration on with
  β = ``beta_end``, as after the warm-up) + backward + the module's Adam step;
- inference images/s: forward in eval mode under ``torch.inference_mode``;
- FLOPs per image of both (``torch.utils.flop_counter.FlopCounterMode``);
- achieved GFLOP/s as a fraction of the machine's fp32 matmul GFLOP/s, measured in the same
  run: every timed step is paired with one timed 2048×2048 fp32 matmul right before it and the
  fraction is the median of the per-pair ratios, so slow drifts in machine load cancel;
- peak memory of one step (CPU: resident-set increase sampled from ``/proc/self/statm``;
  CUDA: ``torch.cuda.max_memory_allocated`` increase).

``--json PATH`` writes the same figures as one JSON object (keys: ``benchmarks/README.md``).
``--profile`` runs ``torch.profiler`` on a few morphaeus training steps and prints where the
time goes, grouped into buckets. Nothing here is a test: speed is never asserted.

Usage::

    python benchmarks/throughput.py --json /tmp/throughput.json
    python benchmarks/throughput.py --models morphaeus --sizes 128 --profile
    python benchmarks/throughput.py --quick          # seconds; smoke test of the script
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as _dt
import gc
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

# anomorph first, as `import anomorph` and the `anomorph` console script do for users: it sets
# OMP_WAIT_POLICY=PASSIVE and the thread count before torch loads (anomorph.runtime).
import anomorph  # noqa: F401,I001
import torch
from torch.utils.flop_counter import FlopCounterMode

from anomorph.data.io import write_json
from anomorph.config import config_to_dict, load_config
from anomorph import losses as loss_module
from anomorph.training.module import AnomalyModule, is_deformable

SCHEMA = "anomorph.throughput/1"
REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
MODELS = ("ae", "vae", "morphaeus")
MATMUL_SIZE = 2048

# Issue 15's target: deformable AE, 128², batch 16, 2 idle CPU cores, training step (was 0.35).
TARGET = {
    "model": "morphaeus",
    "size": 128,
    "batch_size": 16,
    "metric": "train.fraction_of_matmul",
    "threshold": 0.50,
    "reference": "a direct re-implementation of the published architecture reaches about 0.18 (10.6 images/s)",
}
# SPEC §5 / the uncertainty issue: MC dropout with N = 8 costs at most 3x one plain pass.
UNCERTAINTY_TARGET = {"estimator": "mc_dropout", "passes": 8, "max_cost_vs_plain": 3.0}
UNCERTAINTY_ESTIMATORS = {"mc_dropout": {"passes": 8}, "tta": {}, "registration": {}}

PROFILE_BUCKETS = ("conv", "NCC/SSIM filtering", "grid_sample/warping", "activations/norm", "optimizer", "other")


# --------------------------------------------------------------------------- environment
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def cpu_flags() -> list[str] | None:
    """The instruction-set flags of :data:`CPU_FLAGS` that ``/proc/cpuinfo`` lists (None off Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return [flag for flag in CPU_FLAGS if flag in present]
    except OSError:
        return None
    return None


def environment(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        # what the CPU kernels may use: figures from hosts with other instruction sets (e.g. with or
        # without AVX-512 bf16) do not compare, not even as fractions of the matmul rate
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": cpu_flags(),
        # Thread settings from the environment (null when unset); OMP_WAIT_POLICY matters on shared CPUs.
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    if device.type == "cuda":
        # TF32 convolutions/matmuls would not be fp32 work; recorded so ratios can be read correctly.
        info["cuda_matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        info["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    return info


# --------------------------------------------------------------------------- measurement
def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes (synchronised on CUDA)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


class MatmulProbe:
    """One n×n fp32 matmul: its FLOPs and a callable that runs it (used as the rate reference)."""

    def __init__(self, device: torch.device, n: int = MATMUL_SIZE) -> None:
        generator = torch.Generator().manual_seed(0)
        self.n = n
        self.device = device
        self.a = torch.randn(n, n, generator=generator).to(device)
        self.b = torch.randn(n, n, generator=generator).to(device)
        self.out = torch.empty(n, n, device=device)
        self.flops = 2 * n**3

    def __call__(self) -> None:
        torch.mm(self.a, self.b, out=self.out)

    def gflops(self, repeats: int, warmup: int = 1) -> list[float]:
        for _ in range(max(warmup, 1)):
            timed(self, self.device)
        return [self.flops / timed(self, self.device) / 1e9 for _ in range(repeats)]


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` as counted by ``FlopCounterMode`` (matmul/conv-type ops)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def _libc_trim() -> None:
    """Return freed heap memory to the OS (glibc), so the RSS baseline is not inflated."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return None


class _RssSampler(threading.Thread):
    """Samples the resident set size every ``interval`` seconds until stopped; keeps the maximum."""

    def __init__(self, interval: float = 0.0005) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = _rss_bytes() or 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            rss = _rss_bytes()
            if rss is not None and rss > self.peak:
                self.peak = rss
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        rss = _rss_bytes()
        return max(self.peak, rss or 0)


def peak_memory(fn: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Peak memory increase during one call of ``fn``, in MiB, and how it was measured.

    CUDA: ``max_memory_allocated`` minus the allocated memory before the call. CPU: maximum
    resident set size sampled every 0.5 ms from ``/proc/self/statm`` minus the RSS just
    before the call (after ``gc.collect`` and glibc ``malloc_trim``); without ``/proc`` the
    increase of ``ru_maxrss``, which is 0 unless the process' all-time peak grows.
    """
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        return {"peak_memory_mib": peak / 2**20, "memory_method": "cuda.max_memory_allocated"}
    _libc_trim()
    before = _rss_bytes()
    if before is not None:
        sampler = _RssSampler()
        sampler.start()
        try:
            fn()
        finally:
            peak = sampler.stop()
        return {"peak_memory_mib": max(peak - before, 0) / 2**20, "memory_method": "rss_sampled"}
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    end = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_memory_mib": (end - start) * scale / 2**20, "memory_method": "ru_maxrss_delta"}


def paired_rates(
    fn: Callable[[], Any], flops: int, probe: MatmulProbe, repeats: int, warmup: int, images: int
) -> dict[str, Any]:
    """Time ``fn`` ``repeats`` times, each right after one timed matmul; medians and ratios."""
    for _ in range(warmup):
        fn()
    synchronize(probe.device)
    seconds, ratios, matmul = [], [], []
    for _ in range(repeats):
        reference = probe.flops / timed(probe, probe.device) / 1e9
        elapsed = timed(fn, probe.device)
        seconds.append(elapsed)
        matmul.append(reference)
        ratios.append(flops / elapsed / 1e9 / reference)
    median = statistics.median(seconds)
    return {
        "images_per_s": images / median,
        "seconds_per_batch": median,
        "seconds_samples": [round(s, 6) for s in seconds],
        "flops_per_image": flops / images,
        "gflops_per_s": flops / median / 1e9,
        "fraction_of_matmul": statistics.median(ratios),
        "matmul_gflops_samples": [round(g, 3) for g in matmul],
    }


# --------------------------------------------------------------------------- models
def build_module(model: str, size: int, config_dir: Path = CONFIG_DIR) -> AnomalyModule:
    """The LightningModule of ``configs/<model>.yaml`` with the image size set to ``size``."""
    config = load_config(config_dir / f"{model}.yaml", [f"data.size={size}", f"model.options.image_size={size}"])
    return AnomalyModule(config_to_dict(config))


class Workload:
    """A model at one size: its training step and inference pass on a fixed random batch."""

    def __init__(self, model: str, size: int, batch_size: int, device: torch.device, seed: int = 0,
                 training_layout: bool = True) -> None:
        """``training_layout``: store the network and batch as ``anomorph fit`` does (channels-last
        on CPU, :meth:`AnomalyModule.memory_format`); False: NCHW, as ``predict`` runs a loaded
        network (for inference and uncertainty timings)."""
        torch.manual_seed(seed)
        self.model = model
        self.size = size
        self.batch_size = batch_size
        self.device = device
        self.module = build_module(model, size).to(device)
        self.network = self.module.network
        config = self.module.run_config
        # Registration on, final weight: the cost of a training step after the warm-up.
        self.beta = config.train.beta_end if is_deformable(config) else None
        # the layout and optimiser `anomorph fit` uses (channels-last on CPU, fused Adam)
        self.layout = self.module.apply_memory_format(device) if training_layout else torch.contiguous_format
        self.optimizer = self.module.configure_optimizers()
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.rand(batch_size, 1, size, size, generator=generator).to(device)
        self.x = self.x.contiguous(memory_format=self.layout)

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.network.parameters())

    def train_step(self) -> float:
        self.network.train()
        self.optimizer.zero_grad(set_to_none=True)
        out = self.network(self.x)
        loss = self.module.compute_losses(self.x, out, self.beta)["loss"]
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def infer(self) -> torch.Tensor:
        self.network.eval()
        with torch.inference_mode():
            return self.network(self.x).warped

    def count_train_flops(self) -> int:
        # One extra real step (the optimizer advances once more; harmless for timing).
        return count_flops(self.train_step)

    def count_inference_flops(self) -> int:
        return count_flops(self.infer)


def benchmark_workload(workload: Workload, probe: MatmulProbe, repeats: int, warmup: int,
                       inference_workload: Workload | None = None) -> dict[str, Any]:
    """Training step of ``workload`` and inference pass of ``inference_workload`` (default: the
    same; pass one built with ``training_layout=False`` to time inference as predict runs it)."""
    images = workload.batch_size
    inference_workload = inference_workload or workload
    train_flops = workload.count_train_flops()
    infer_flops = inference_workload.count_inference_flops()
    train = paired_rates(workload.train_step, train_flops, probe, repeats, warmup, images)
    train.update(peak_memory(workload.train_step, workload.device))
    inference = paired_rates(inference_workload.infer, infer_flops, probe, repeats, warmup, images)
    inference.update(peak_memory(inference_workload.infer, inference_workload.device))
    return {"train": train, "inference": inference}


# --------------------------------------------------------------------------- training-step variants
TRAIN_VARIANTS = ("default", "nchw+loop_adam", "channels_last", "foreach_adam", "channels_last+foreach_adam",
                  "bf16_autocast")


class VariantWorkload(Workload):
    """A :class:`Workload` whose training step runs one variant (same seed, same batch, same
    initial weights as ``default``). ``default`` is what ``anomorph fit`` does
    (:meth:`AnomalyModule.memory_format` — channels-last on CPU — and
    :meth:`AnomalyModule.configure_optimizers` — fused Adam); ``nchw+loop_adam`` is the setup
    before issue 15 (NCHW network and batch, PyTorch's default per-parameter Adam loop on CPU);
    ``channels_last`` and ``foreach_adam`` each add one change to ``nchw+loop_adam``;
    ``channels_last+foreach_adam`` is ``default`` with the multi-tensor Adam update that ``fit``
    used before the fused one; ``bf16_autocast`` is ``default`` with the forward and loss under
    ``torch.autocast(device, torch.bfloat16)``."""

    def __init__(self, variant: str, model: str, size: int, batch_size: int, device: torch.device) -> None:
        super().__init__(model, size, batch_size, device)
        self.variant = variant
        if variant in ("default", "bf16_autocast"):
            return
        config = self.module.run_config.train
        layout = (torch.channels_last if variant == "channels_last"
                  else self.layout if variant == "channels_last+foreach_adam" else torch.contiguous_format)
        self.network.to(memory_format=layout)
        self.x = self.x.contiguous(memory_format=layout)
        flag = {"foreach": variant in ("foreach_adam", "channels_last+foreach_adam")}
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=config.lr,
                                          weight_decay=config.weight_decay, **flag)

    def train_step(self) -> float:
        if self.variant != "bf16_autocast":
            return super().train_step()
        self.network.train()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            out = self.network(self.x)
            loss = self.module.compute_losses(self.x, out, self.beta)["loss"]
        loss.float().backward()
        self.optimizer.step()
        return float(loss.detach())


def benchmark_train_variants(model: str, size: int, batch_size: int, device: torch.device, probe: MatmulProbe,
                             repeats: int, warmup: int, variants: Sequence[str] = TRAIN_VARIANTS,
                             accuracy_steps: int = 5) -> dict[str, Any]:
    """The training step of ``model`` at ``size`` in every variant, interleaved: each repeat runs a
    timed matmul and then one step of each variant in turn (matmul before every step), so the
    fractions of the matmul rate and the ratios to ``default`` are taken under the same load.
    Accuracy: from the same initial weights, the losses of ``accuracy_steps`` steps of each
    variant vs those of ``default`` (largest relative difference), before timing."""
    flops = count_flops(Workload(model, size, batch_size, device).train_step)
    workloads = {v: VariantWorkload(v, model, size, batch_size, device) for v in variants}
    result: dict[str, Any] = {"model": model, "size": size, "batch_size": batch_size,
                              "flops_per_image": flops / batch_size, "variants": {}}
    losses: dict[str, list[float]] = {}
    for name, workload in workloads.items():
        try:
            torch.manual_seed(1)  # the same dropout draws for every variant
            losses[name] = [workload.train_step() for _ in range(accuracy_steps)]
        except Exception as err:  # noqa: BLE001 - an unsupported variant must not stop the run
            result["variants"][name] = {"error": f"{type(err).__name__}: {err}"}
    active = [v for v in workloads if v in losses]
    for name in active:
        for _ in range(warmup):
            workloads[name].train_step()
    seconds: dict[str, list[float]] = {v: [] for v in active}
    fractions: dict[str, list[float]] = {v: [] for v in active}
    for _ in range(repeats):
        for name in active:
            reference = probe.flops / timed(probe, probe.device) / 1e9
            elapsed = timed(workloads[name].train_step, device)
            seconds[name].append(elapsed)
            fractions[name].append(flops / elapsed / 1e9 / reference)
    base = losses.get("default")
    for name in active:
        ratios = [d / v for d, v in zip(seconds.get("default", []), seconds[name])]
        rel = None
        if base is not None:
            rel = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses[name], base))
        result["variants"][name] = {
            "images_per_s": batch_size / statistics.median(seconds[name]),
            "seconds_samples": [round(t, 6) for t in seconds[name]],
            "fraction_of_matmul": _spread(fractions[name]),
            "speed_vs_default": _spread(ratios) if ratios else None,
            "losses": losses[name],
            "max_relative_loss_difference_vs_default": rel,
        }
    return result


def format_train_variants(entry: dict[str, Any]) -> str:
    lines = [f"training-step variants ({entry['model']}, {entry['size']}², batch {entry['batch_size']}; "
             f"interleaved; median [min-max]):",
             f"  {'variant':<14} {'img/s':>7}  {'of matmul':<22} {'speed vs default':<22} max rel. loss diff (5 steps)"]
    for name, v in entry["variants"].items():
        if "error" in v:
            lines.append(f"  {name:<14} error: {v['error']}")
            continue
        f, r = v["fraction_of_matmul"], v["speed_vs_default"]
        frac = f"{f['median']:.3f} [{f['min']:.3f}-{f['max']:.3f}]"
        speed = "—" if r is None else f"{r['median']:.2f}x [{r['min']:.2f}-{r['max']:.2f}]"
        diff = v["max_relative_loss_difference_vs_default"]
        lines.append(f"  {name:<14} {v['images_per_s']:7.2f}  {frac:<22} {speed:<22} "
                     + ("—" if diff is None else f"{diff:.1e}"))
    return "\n".join(lines)


# --------------------------------------------------------------------------- uncertainty hook
def _find_estimator_builder() -> Callable[..., Any] | None:
    try:
        import anomorph.uncertainty as uncertainty  # noqa: PLC0415
    except ImportError:
        return None
    return getattr(uncertainty, "build_estimator", None)


def timed_both(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call of ``fn`` (synchronised on CUDA)."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def _spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def benchmark_uncertainty(workload: Workload, repeats: int, warmup: int) -> dict[str, Any]:
    """Images/s of each uncertainty estimator and its cost relative to one plain inference pass.

    Uses ``anomorph.uncertainty.build_estimator(name, **options)(network, images)`` when it
    exists; otherwise returns ``{"available": False, "reason": ...}``. The plain pass is
    ``network(images)`` in eval mode under ``torch.no_grad`` (as the estimators run). Every
    repeat times one plain pass and then one estimator call, back to back, so each ratio is
    taken under the same load; reported: the median (and min, max) of those per-repeat ratios,
    by wall time (``cost_vs_plain``) and by the process's CPU time (``cpu_cost_vs_plain``: what
    the process itself computed, less sensitive to other processes taking the cores).
    """
    builder = _find_estimator_builder()
    if builder is None:
        return {"available": False, "reason": "anomorph.uncertainty.build_estimator not found", "size": workload.size}
    device = workload.device
    network, x = workload.network, workload.x

    def plain() -> Any:
        network.eval()
        with torch.no_grad():
            return network(x)

    for _ in range(max(warmup, 1)):
        plain()
    result: dict[str, Any] = {
        "available": True,
        "size": workload.size,
        "batch_size": workload.batch_size,
        "timing": "interleaved: plain pass, then the estimator, per repeat; ratios per repeat",
        "estimators": {},
    }
    plain_walls: list[float] = []
    deformable = hasattr(network, "velocity_head")
    for name, options in UNCERTAINTY_ESTIMATORS.items():
        entry: dict[str, Any] = {"options": dict(options)}
        if name == "registration" and not deformable:
            entry["skipped"] = "needs a deformable model"
            result["estimators"][name] = entry
            continue
        try:
            estimator = builder(name, **options)
            if hasattr(estimator, "options"):
                entry["options"] = {k: v for k, v in estimator.options().items() if _is_jsonable(v)}

            def run(estimator: Any = estimator) -> Any:
                return estimator(network, x)

            for _ in range(max(warmup, 1)):
                run()
            pairs = []
            for _ in range(repeats):
                pairs.append((timed_both(plain, device), timed_both(run, device)))
            walls = [e[0] for _, e in pairs]
            plain_walls += [p[0] for p, _ in pairs]
            wall_ratios = [e[0] / p[0] for p, e in pairs]
            cpu_ratios = [e[1] / p[1] for p, e in pairs if p[1] > 0]
            entry.update(images_per_s=workload.batch_size / statistics.median(walls),
                         cost_vs_plain=statistics.median(wall_ratios), cost_vs_plain_spread=_spread(wall_ratios),
                         cpu_cost_vs_plain=statistics.median(cpu_ratios) if cpu_ratios else None,
                         cpu_cost_vs_plain_spread=_spread(cpu_ratios) if cpu_ratios else None,
                         seconds_samples=walls, plain_seconds_samples=[p[0] for p, _ in pairs])
        except Exception as err:  # noqa: BLE001 - a broken estimator must not stop the benchmark
            entry["error"] = f"{type(err).__name__}: {err}"
        result["estimators"][name] = entry
    if not plain_walls:
        plain_walls = [timed(plain, device) for _ in range(repeats)]
    result["plain_images_per_s"] = workload.batch_size / statistics.median(plain_walls)
    mc = result["estimators"].get(UNCERTAINTY_TARGET["estimator"], {})
    if "cost_vs_plain" in mc:
        result["target"] = {**UNCERTAINTY_TARGET, "value": mc["cost_vs_plain"], "cpu_value": mc["cpu_cost_vs_plain"],
                            "met": mc["cost_vs_plain"] <= UNCERTAINTY_TARGET["max_cost_vs_plain"]}
    return result


def _is_jsonable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


# --------------------------------------------------------------------------- profiler
REGION_NCC_SSIM = "anomorph::ncc_ssim"
REGION_WARP = "anomorph::warp"
REGION_OPTIMIZER = "anomorph::optimizer"
REGION_BUCKETS = {REGION_NCC_SSIM: "NCC/SSIM filtering", REGION_WARP: "grid_sample/warping",
                  REGION_OPTIMIZER: "optimizer"}
CONV_OPS = ("conv", "mkldnn_convolution", "_convolution", "convolution_backward", "slow_conv")
ACT_NORM_OPS = ("batch_norm", "leaky_relu", "relu", "silu", "gelu", "elu", "tanh", "sigmoid", "dropout",
                "bernoulli", "group_norm", "instance_norm", "layer_norm")


@contextlib.contextmanager
def _labelled_regions(workload: Workload) -> Iterator[None]:
    """Label the loss filters, the integrator/warper and the optimizer step for the profiler."""
    from torch.profiler import record_function  # noqa: PLC0415

    patched = {}
    for name in ("ssim_loss", "local_ncc_loss"):
        original = getattr(loss_module, name)

        def wrapper(*args: Any, _original: Callable[..., Any] = original, **kwargs: Any) -> Any:
            with record_function(REGION_NCC_SSIM):
                return _original(*args, **kwargs)

        patched[name] = original
        setattr(loss_module, name, wrapper)
    handles = []
    for attr in ("integrator", "warper"):
        submodule = getattr(workload.network, attr, None)
        if submodule is None:
            continue
        contexts: list[Any] = []

        def pre_hook(module: Any, args: Any, _contexts: list[Any] = contexts) -> None:
            context = record_function(REGION_WARP)
            context.__enter__()
            _contexts.append(context)

        def post_hook(module: Any, args: Any, output: Any, _contexts: list[Any] = contexts) -> None:
            _contexts.pop().__exit__(None, None, None)

        handles += [submodule.register_forward_pre_hook(pre_hook), submodule.register_forward_hook(post_hook)]
    original_step = workload.optimizer.step

    def step(*args: Any, **kwargs: Any) -> Any:
        with record_function(REGION_OPTIMIZER):
            return original_step(*args, **kwargs)

    workload.optimizer.step = step  # type: ignore[method-assign]
    try:
        yield
    finally:
        for name, original in patched.items():
            setattr(loss_module, name, original)
        for handle in handles:
            handle.remove()
        del workload.optimizer.step


def _is_separable_filter(shapes: Sequence[Sequence[int]], backward: bool) -> bool:
    """A depthwise 1D filter (weight ``(C, 1, k, 1)``-like): the SSIM / NCC moment filtering."""
    index = 2 if backward else 1
    if len(shapes) <= index or len(shapes[index]) < 3:
        return False
    weight = shapes[index]
    kernel = weight[2:]
    return weight[1] == 1 and max(kernel) > 1 and min(kernel) == 1


def classify(name: str, region: str | None, shapes: Sequence[Sequence[int]] = ()) -> str:
    """Bucket of one profiler op from its name, the labelled region it ran for, and its shapes."""
    lowered = name.lower()
    if region in REGION_BUCKETS:
        return REGION_BUCKETS[region]
    if "grid_sampler" in lowered:
        return "grid_sample/warping"
    if "optimizer" in lowered or "adam" in lowered:
        return "optimizer"
    if any(op in lowered for op in CONV_OPS):
        if shapes and _is_separable_filter(shapes, "backward" in lowered):
            return "NCC/SSIM filtering"
        return "conv"
    if any(op in lowered for op in ACT_NORM_OPS):
        return "activations/norm"
    return "other"


def _region_of(event: Any) -> str | None:
    node = event
    while node is not None:
        if node.name in REGION_BUCKETS:
            return node.name
        node = node.cpu_parent
    return None


def _backward_node(event: Any) -> Any | None:
    node = event
    while node is not None:
        if node.name.startswith("autograd::engine::evaluate_function"):
            return node
        node = node.cpu_parent
    return None


def attribute_events(events: Sequence[Any]) -> list[tuple[str, str, float, list]]:
    """(op name, bucket, self CPU µs, input shapes) for every profiler event.

    Forward ops take the region of the labelled block around them; backward ops take the
    region of the forward op with the same autograd ``sequence_nr``.
    """
    forward_region: dict[tuple[int, int], str] = {}
    for event in events:
        if event.sequence_nr >= 0 and not event.name.startswith("autograd::"):
            region = _region_of(event)
            if region is not None:
                forward_region[(event.thread, event.sequence_nr)] = region
    rows = []
    for event in events:
        region = _region_of(event)
        if region is None:
            node = _backward_node(event)
            if node is not None:
                region = forward_region.get((node.fwd_thread, node.sequence_nr)) or forward_region.get(
                    (node.thread, node.sequence_nr)
                )
        shapes = getattr(event, "input_shapes", None) or []
        rows.append((event.name, classify(event.name, region, shapes), float(event.self_cpu_time_total), shapes))
    return rows


def profile_training(workload: Workload, steps: int = 3, warmup: int = 1, top: int = 15) -> dict[str, Any]:
    """Profile ``steps`` training steps; self CPU time per bucket and the top ops."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    for _ in range(warmup):
        workload.train_step()
    activities = [ProfilerActivity.CPU]
    if workload.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with _labelled_regions(workload):
        start = time.perf_counter()
        with profile(activities=activities, record_shapes=True) as prof:
            for _ in range(steps):
                workload.train_step()
            synchronize(workload.device)
        wall = time.perf_counter() - start
    rows = attribute_events(prof.events())
    buckets = {bucket: 0.0 for bucket in PROFILE_BUCKETS}
    ops: dict[tuple[str, str], list[float]] = {}
    for name, bucket, self_us, _shapes in rows:
        buckets[bucket] += self_us
        entry = ops.setdefault((name, bucket), [0.0, 0])
        entry[0] += self_us
        entry[1] += 1
    total = sum(buckets.values()) or 1.0
    top_ops = sorted(ops.items(), key=lambda item: -item[1][0])[:top]
    return {
        "model": workload.model,
        "size": workload.size,
        "batch_size": workload.batch_size,
        "steps": steps,
        "wall_seconds_per_step": wall / steps,
        "self_cpu_ms_per_step": total / steps / 1e3,
        "buckets": {
            bucket: {"ms_per_step": us / steps / 1e3, "fraction": us / total} for bucket, us in buckets.items()
        },
        "top_ops": [
            {"op": name, "bucket": bucket, "ms_per_step": us / steps / 1e3, "calls_per_step": count / steps,
             "fraction": us / total}
            for (name, bucket), (us, count) in top_ops
        ],
    }


# --------------------------------------------------------------------------- reporting
def format_table(results: dict[str, Any]) -> str:
    header = (
        f"{'model':<10} {'size':>5} {'mode':<6} {'img/s':>8} {'GFLOP/img':>10} {'GFLOP/s':>8} "
        f"{'of matmul':>9} {'peak MiB':>9}"
    )
    lines = [header, "-" * len(header)]
    for model, entry in results["models"].items():
        for size, figures in entry["sizes"].items():
            for mode in ("train", "inference"):
                f = figures[mode]
                lines.append(
                    f"{model:<10} {size:>5} {mode[:5]:<6} {f['images_per_s']:8.2f} {f['flops_per_image'] / 1e9:10.3f} "
                    f"{f['gflops_per_s']:8.2f} {100 * f['fraction_of_matmul']:8.1f}% {f['peak_memory_mib']:9.1f}"
                )
    return "\n".join(lines)


def format_profile(profile: dict[str, Any]) -> str:
    lines = [
        f"profile: {profile['model']} training step, {profile['size']}², batch {profile['batch_size']}, "
        f"{profile['steps']} steps; {profile['wall_seconds_per_step']:.3f} s/step wall, "
        f"{profile['self_cpu_ms_per_step']:.0f} ms/step self CPU",
        f"  {'bucket':<22} {'ms/step':>9} {'share':>7}",
    ]
    for bucket, figures in sorted(profile["buckets"].items(), key=lambda item: -item[1]["ms_per_step"]):
        lines.append(f"  {bucket:<22} {figures['ms_per_step']:9.1f} {100 * figures['fraction']:6.1f}%")
    lines.append("  top ops by self CPU time:")
    for op in profile["top_ops"]:
        lines.append(
            f"    {op['op'][:44]:<44} {op['bucket']:<20} {op['ms_per_step']:8.1f} ms "
            f"{100 * op['fraction']:5.1f}%  ({op['calls_per_step']:.0f} calls)"
        )
    return "\n".join(lines)


def format_uncertainty(model: str, entry: dict[str, Any]) -> str:
    if not entry.get("available"):
        return f"uncertainty ({model}): not measured ({entry.get('reason')})"
    lines = [f"uncertainty ({model}, {entry['size']}²): plain pass {entry['plain_images_per_s']:.2f} img/s"]
    for name, figures in entry["estimators"].items():
        if "error" in figures:
            lines.append(f"  {name:<13} error: {figures['error']}")
        elif "skipped" in figures:
            lines.append(f"  {name:<13} skipped: {figures['skipped']}")
        else:
            spread = figures.get("cost_vs_plain_spread") or {}
            cpu = figures.get("cpu_cost_vs_plain")
            lines.append(f"  {name:<13} {figures['images_per_s']:8.2f} img/s  {figures['cost_vs_plain']:5.2f}x plain"
                         + (f" [{spread['min']:.2f}-{spread['max']:.2f}]" if spread else "")
                         + (f"  CPU time {cpu:5.2f}x" if cpu is not None else ""))
    if "target" in entry:
        target = entry["target"]
        cpu = target.get("cpu_value")
        lines.append(
            f"  target: MC dropout (N={target['passes']}) <= {target['max_cost_vs_plain']:.0f}x plain: "
            f"{target['value']:.2f}x (wall)" + (f", {cpu:.2f}x (CPU time)" if cpu is not None else "")
            + f" -> {'MET' if target['met'] else 'NOT MET'}"
        )
    return "\n".join(lines)


def evaluate_target(results: dict[str, Any]) -> dict[str, Any]:
    target = dict(TARGET)
    figures = results["models"].get(target["model"], {}).get("sizes", {}).get(str(target["size"]))
    same_batch = results["settings"]["batch_size"] == target["batch_size"]
    if figures is None or not same_batch:
        target.update(value=None, met=None, note="not measured in this run (needs morphaeus at 128², batch 16)")
    else:
        value = figures["train"]["fraction_of_matmul"]
        target.update(value=value, met=value >= target["threshold"], images_per_s=figures["train"]["images_per_s"])
        if results["environment"]["threads"] != 2 or results["environment"]["device"] != "cpu":
            target["note"] = "the target is stated for 2 CPU threads; this run used other settings"
    return target


def format_target(target: dict[str, Any]) -> str:
    head = (f"target: {target['model']} training step at {target['size']}², batch {target['batch_size']}: "
            f">= {100 * target['threshold']:.0f}% of the matmul rate ({target['reference']})")
    if target["value"] is None:
        return f"{head}\n  -> {target['note']}"
    verdict = "MET" if target["met"] else "NOT MET"
    line = f"{head}\n  -> {100 * target['value']:.1f}% ({target['images_per_s']:.2f} img/s): {verdict}"
    if target.get("note"):
        line += f" ({target['note']})"
    return line


# --------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="image sizes (default: 64 128)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per batch (default: 16)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=None, help="models (default: all)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per figure (default: 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (default: 2)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the figures as JSON")
    parser.add_argument("--profile", action="store_true", help="profile morphaeus training steps")
    parser.add_argument("--profile-size", type=int, default=None, help="size to profile (default: largest)")
    parser.add_argument("--profile-steps", type=int, default=3, help="steps to profile (default: 3)")
    parser.add_argument("--train-variants", action="store_true",
                        help="compare the morphaeus training step at the largest size: channels_last, foreach/fused "
                             "Adam, bf16 autocast (interleaved with the default)")
    parser.add_argument("--no-uncertainty", action="store_true", help="skip the uncertainty estimator timings")
    parser.add_argument("--uncertainty-only", action="store_true",
                        help="only the uncertainty estimator timings (no training/inference figures)")
    parser.add_argument("--demo", type=Path, default=None, metavar="DIR",
                        help="also run `anomorph demo --out DIR` end to end and report its time per stage")
    parser.add_argument("--quick", action="store_true",
                        help="tiny smoke run: 32², batch 2, 1 repeat, no warm-up, 1 thread, 256² matmul")
    args = parser.parse_args(argv)
    # --quick runs one thread so that a busy machine cannot stall it (see README: oversubscription).
    quick = {"sizes": [32], "batch_size": 2, "repeats": 1, "warmup": 0, "threads": 1}
    full = {"sizes": [64, 128], "batch_size": 16, "repeats": 5, "warmup": 2}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.models is None:
        args.models = list(MODELS)
    if args.repeats < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error("--repeats must be >= 1, --warmup >= 0 and --batch-size >= 1")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure everything ``args`` asks for; the torch thread count is restored afterwards."""
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def contention_warning(results: dict[str, Any]) -> str | None:
    """A warning when other processes competed for the cores during the run (CPU only)."""
    env = results["environment"]
    loads = [v for v in (results["load_average"]["start"], results["load_average"]["end"]) if v]
    if env["device"] != "cpu" or not loads or not env.get("cpu_count"):
        return None
    highest = max(load[0] for load in loads)
    # Our own process contributes about one runnable task per thread while it runs.
    if highest <= env["cpu_count"] + 0.5:
        return None
    message = (f"1-min load average reached {highest:.2f} on {env['cpu_count']} CPUs: other processes competed "
               f"for the cores, so absolute rates are low.")
    if env["threads"] > 1 and (env.get("omp_wait_policy") or "").upper() != "PASSIVE":
        message += (f" With {env['threads']} OpenMP threads spinning at every op's barrier while a peer is "
                    f"descheduled, a network of many small ops slows far more than the matmul reference, so "
                    f"'of matmul' is pessimistic: rerun on an idle machine, with OMP_WAIT_POLICY=PASSIVE "
                    f"set before Python starts, or with --threads 1.")
    return message


def _run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python", "benchmarks/throughput.py", *sys.argv[1:]]),
        "environment": environment(device),
        "settings": {
            "sizes": list(args.sizes), "batch_size": args.batch_size, "models": list(args.models),
            "repeats": args.repeats, "warmup": args.warmup, "quick": bool(args.quick),
            "uncertainty_only": bool(args.uncertainty_only),
        },
        "load_average": {"start": load_average()},
    }
    probe = MatmulProbe(device, n=256 if args.quick else MATMUL_SIZE)
    start_rates = probe.gflops(max(args.repeats, 3))
    results["models"] = {}
    all_rates = list(start_rates)
    for model in args.models:
        entry: dict[str, Any] = {"sizes": {}}
        for size in ([] if args.uncertainty_only else args.sizes):
            workload = Workload(model, size, args.batch_size, device)
            entry["parameters"] = workload.parameters
            figures = benchmark_workload(workload, probe, args.repeats, args.warmup,
                                         Workload(model, size, args.batch_size, device, training_layout=False))
            all_rates += figures["train"]["matmul_gflops_samples"] + figures["inference"]["matmul_gflops_samples"]
            entry["sizes"][str(size)] = figures
            print(f"  measured {model} {size}² (load {load_average()})", file=sys.stderr, flush=True)
            del workload
        size = 128 if 128 in args.sizes else max(args.sizes)
        if args.no_uncertainty:
            entry["uncertainty"] = {"available": False, "reason": "skipped (--no-uncertainty)", "size": size}
        else:
            entry["uncertainty"] = benchmark_uncertainty(
                Workload(model, size, args.batch_size, device, training_layout=False), args.repeats, args.warmup
            )
        results["models"][model] = entry
    results["matmul"] = {
        "n": probe.n,
        "dtype": "float32",
        "gflops": statistics.median(all_rates),
        "gflops_at_start": statistics.median(start_rates),
        "gflops_min": min(all_rates),
        "gflops_max": max(all_rates),
        "samples": len(all_rates),
    }
    results["target"] = evaluate_target(results)
    results["train_variants"] = None
    if args.train_variants:
        results["train_variants"] = benchmark_train_variants("morphaeus", max(args.sizes), args.batch_size, device,
                                                             probe, args.repeats, args.warmup)
    results["profile"] = None
    if args.profile:
        size = args.profile_size or max(args.sizes)
        workload = Workload("morphaeus", size, args.batch_size, device)
        results["profile"] = profile_training(workload, steps=args.profile_steps)
    results["load_average"]["end"] = load_average()
    results["warning"] = contention_warning(results)
    return results


def demo_stages(out: Path) -> dict[str, object]:
    """Run the demo (``anomorph.run_demo``) and return its wall time split by stage (seconds).

    A demo folder that already holds results is reused by the resumable runner, so pass an
    empty folder for a full measurement."""
    from anomorph.benchmark.demo import run_demo

    result = run_demo(out)
    return {"total_s": result.seconds, "stages_s": dict(result.stages), "out": str(out)}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    env = results["environment"]
    print(f"anomorph throughput: torch {env['torch']}, device {env['device_name']}, {env['threads']} threads "
          f"(OMP_WAIT_POLICY={env['omp_wait_policy'] or 'unset'}), "
          f"batch {results['settings']['batch_size']}, median of {results['settings']['repeats']} "
          f"(warm-up {results['settings']['warmup']})")
    mm = results["matmul"]
    print(f"fp32 matmul {mm['n']}x{mm['n']}: {mm['gflops']:.1f} GFLOP/s median "
          f"(range {mm['gflops_min']:.1f}-{mm['gflops_max']:.1f} over {mm['samples']} samples)")
    print(f"load average: start {results['load_average']['start']}, end {results['load_average']['end']}")
    print(format_table(results))
    print("('of matmul' = median over repeats of step GFLOP/s / matmul GFLOP/s timed just before the step)")
    for model, entry in results["models"].items():
        if "uncertainty" in entry:
            print(format_uncertainty(model, entry["uncertainty"]))
    print(format_target(results["target"]))
    if results.get("train_variants"):
        print(format_train_variants(results["train_variants"]))
    if results["warning"]:
        print(f"WARNING: {results['warning']}")
    if results["profile"] is not None:
        print(format_profile(results["profile"]))
    if args.demo is not None:
        results["demo"] = demo_stages(args.demo)
        print(f"demo (end to end, {args.demo}): {results['demo']['total_s']:.0f} s = "
              + ", ".join(f"{k} {v:.0f} s" for k, v in results["demo"]["stages_s"].items()))
    if args.json is not None:
        print(f"wrote {write_json(args.json, results, allow_nan=False)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
