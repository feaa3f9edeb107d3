"""Pick the guidance threshold on the VAL split (never test): val pixel AUPRC per strategy.

    .venv/bin/python scripts/tune_guidance.py [BENCHMARK_DIR]     # default runs/benchmark

Needs the seed-0 morphaeus and conditioned runs of `anomorph benchmark --config
benchmarks/phantom.yaml`. Prints val AUPRC / HRR / LPR for thresholds 0.5, 0.9, 0.99.
"""
import dataclasses
import sys

from anomorph.training import load_run
from anomorph.training.datamodule import slice_config
from anomorph.evaluation.evaluate import EvaluationData, evaluate_scorer
from anomorph.guidance.scorer import GuidedScorer
from anomorph.guidance.sources import uncertainty_source, residual_normaliser
from anomorph.evaluation.inference import ModelScorer
root = f"{sys.argv[1] if len(sys.argv) > 1 else 'runs/benchmark'}/phantom"
net, cfg = load_run(f"{root}/morphaeus/seed0")
cnet, ccfg = load_run(f"{root}/conditioned/seed0")
data = EvaluationData.load(cfg.data.manifest, slice_config(cfg.data))
healthy = data.val.labels == 0
hi, hb = data.val.images[healthy], data.val.brain_masks[healthy]
data.test = data.val; data.val = None; data.example_indices = []   # tune on val only
src, _ = uncertainty_source("residual_z", net, hi, hb)
csrc, _ = uncertainty_source("residual_z", cnet, hi, hb)
res = residual_normaliser(net, hi, hb)
r = evaluate_scorer(ModelScorer(net, cfg, name="unguided"), data).metrics
print(f"unguided val AUPRC {r['pixel_auprc']:.3f} HRR {r['hrr']:.3f} LPR {r['lpr']:.3f}")
for strategy in ["gating", "map", "iterative", "conditioned"]:
    for thr in [0.5, 0.9, 0.99]:
        g = dataclasses.replace(cfg.guidance, threshold=thr, map_lambda=0.1)
        if strategy == "conditioned":
            sc = GuidedScorer(cnet, ccfg, strategy, csrc, guidance=dataclasses.replace(ccfg.guidance, threshold=thr))
        else:
            sc = GuidedScorer(net, cfg, strategy, src, guidance=g, residual_normaliser=res)
        m = evaluate_scorer(sc, data).metrics
        print(f"{strategy:12s} thr {thr:4.2f}: val AUPRC {m['pixel_auprc']:.3f} HRR {m['hrr']:.3f} LPR {m['lpr']:.3f}", flush=True)
