"""Smoke test of benchmarks/throughput.py: it runs and writes the documented JSON keys.

Speed itself is never asserted (SPEC §5); ``--quick`` only checks the script works.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_throughput():
    spec = importlib.util.spec_from_file_location("anomorph_benchmark_throughput", ROOT / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


FIGURE_KEYS = {
    "images_per_s", "seconds_per_batch", "seconds_samples", "flops_per_image", "gflops_per_s",
    "fraction_of_matmul", "matmul_gflops_samples", "peak_memory_mib", "memory_method",
}


def test_quick_run_writes_documented_json(tmp_path, capsys):
    throughput = load_throughput()
    threads = torch.get_num_threads()
    out = tmp_path / "throughput.json"
    assert throughput.main(["--quick", "--json", str(out)]) == 0
    assert torch.get_num_threads() == threads  # the run restores the thread count

    result = json.loads(out.read_text())
    assert {"schema", "created", "environment", "settings", "load_average", "matmul", "models", "target",
            "profile", "warning"} <= set(result)
    assert result["schema"] == "anomorph.throughput/1"
    assert result["settings"]["sizes"] == [32] and result["settings"]["batch_size"] == 2
    assert result["matmul"]["gflops"] > 0
    assert set(result["models"]) == {"ae", "vae", "morphaeus"}
    for name, model in result["models"].items():
        assert model["parameters"] > 0
        assert set(model["sizes"]) == {"32"}
        for mode in ("train", "inference"):
            figures = model["sizes"]["32"][mode]
            assert FIGURE_KEYS <= set(figures), (name, mode)
            for key in ("images_per_s", "seconds_per_batch", "flops_per_image", "gflops_per_s", "fraction_of_matmul"):
                assert math.isfinite(figures[key]) and figures[key] > 0, (name, mode, key)
            assert figures["peak_memory_mib"] >= 0
        # training counts the backward pass as well
        assert model["sizes"]["32"]["train"]["flops_per_image"] > model["sizes"]["32"]["inference"]["flops_per_image"]
        uncertainty = model["uncertainty"]
        assert "available" in uncertainty
        if uncertainty["available"]:
            assert uncertainty["plain_images_per_s"] > 0
            for estimator in uncertainty["estimators"].values():
                assert "images_per_s" in estimator or "skipped" in estimator or "error" in estimator
    # the deformable model has the extra head and registration loss
    flops = {name: m["sizes"]["32"]["train"]["flops_per_image"] for name, m in result["models"].items()}
    assert flops["morphaeus"] > flops["ae"]
    assert result["target"]["value"] is None and result["target"]["met"] is None  # 128², batch 16 not run
    assert result["profile"] is None
    printed = capsys.readouterr().out
    assert "of matmul" in printed and "target:" in printed


def test_profile_buckets_classify_ops():
    throughput = load_throughput()
    classify = throughput.classify
    assert classify("aten::convolution_backward", None, [[2, 8, 4, 4], [2, 8, 4, 4], [8, 8, 3, 3]]) == "conv"
    assert classify("aten::mkldnn_convolution", None, [[2, 5, 40, 40], [5, 1, 11, 1]]) == "NCC/SSIM filtering"
    assert classify("aten::mul", throughput.REGION_NCC_SSIM) == "NCC/SSIM filtering"
    assert classify("aten::grid_sampler_2d", None) == "grid_sample/warping"
    assert classify("aten::leaky_relu_", None) == "activations/norm"
    assert classify("aten::lerp_", throughput.REGION_OPTIMIZER) == "optimizer"
    assert classify("aten::cat", None) == "other"
