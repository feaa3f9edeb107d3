"""Training-step speed with and without anomorph's threading setup, idle and next to a busy process.

Each measurement is a fresh Python process (the OpenMP runtime reads its environment once, when
torch is loaded), with ``OMP_WAIT_POLICY``, ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` removed
from its environment, so it starts like a user's shell:

- ``without``: the child imports ``torch`` before ``anomorph`` — the OpenMP runtime starts with
  its default policy (threads spin ~300k iterations at every barrier) and torch's default count;
- ``with``: the child imports ``anomorph`` first, as the ``anomorph`` console script and
  ``import anomorph`` do — ``anomorph.runtime`` sets ``OMP_WAIT_POLICY=PASSIVE`` and the
  thread count before torch loads.

``busy`` rows run one competing busy process (``python -c 'while True: pass'``) for the whole
measurement. The step is the one of ``benchmarks/throughput.py`` (forward + the real training
loss + backward + Adam, fixed random batch). Conditions alternate (without, with, without, ...)
so slow changes of the machine's load hit both; ratios are within one run.

Usage::

    python benchmarks/thread_setup.py                      # ae, 64², batch 16, 8 s per row
    python benchmarks/thread_setup.py --model morphaeus --size 128 --json /tmp/threads.json
    python benchmarks/thread_setup.py --spincounts 10000 100000   # + rows with GOMP_SPINCOUNT=N
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
SCHEMA = "anomorph.thread_setup/1"
CLEARED = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "GOMP_SPINCOUNT")


def child(mode: str, model: str, size: int, batch_size: int, seconds: float, warmup: int) -> dict[str, Any]:
    """Run in the child process: time training steps for ``seconds``; return the figures."""
    if mode.startswith("spin="):  # as "with", but GOMP_SPINCOUNT (set by the parent) overrides the wait policy
        mode = "with"
    if mode == "with":
        import anomorph  # noqa: F401  - first: sets the OpenMP environment before torch loads
        import torch
    else:
        import torch  # noqa: F401  - first: the OpenMP runtime starts with its defaults
        import anomorph  # noqa: F401
    from anomorph import runtime

    setup = runtime.configure_threads(announce=lambda line: None) if mode == "with" else None
    sys.path.insert(0, str(HERE))
    from throughput import Workload  # noqa: PLC0415

    workload = Workload(model, size, batch_size, torch.device("cpu"))
    for _ in range(warmup):
        workload.train_step()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 2:
        t0 = time.perf_counter()
        workload.train_step()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {
        "images_per_s": batch_size / median,
        "steps_per_min": 60.0 / median,
        "seconds_per_step": median,
        "steps": len(times),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
        "setup": setup.describe() if setup is not None else None,
    }


def measure(mode: str, busy: bool, args: argparse.Namespace) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    if mode.startswith("spin="):
        env["GOMP_SPINCOUNT"] = mode.split("=", 1)[1]
    spinner = None
    if busy:
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        done = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--model", args.model,
             "--size", str(args.size), "--batch-size", str(args.batch_size), "--seconds", str(args.seconds),
             "--warmup", str(args.warmup)],
            env=env, capture_output=True, text=True, timeout=600)
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    if done.returncode != 0:
        raise SystemExit(f"child ({mode}, busy={busy}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows: dict[str, list[dict[str, Any]]] = {}
    load_start = load_average()
    for _ in range(args.rounds):
        for busy in (False, True):
            for mode in ("without", "with", *(f"spin={n}" for n in args.spincounts)):
                key = f"{'busy' if busy else 'idle'}/{mode}"
                result = measure(mode, busy, args)
                rows.setdefault(key, []).append(result)
                print(f"  {key:<13} {result['images_per_s']:7.2f} img/s  ({result['torch_threads']} threads, "
                      f"OMP_WAIT_POLICY={result['omp_wait_policy']}, load {load_average()})",
                      file=sys.stderr, flush=True)
    figures = {}
    for key, results in rows.items():
        figures[key] = {**results[-1], "images_per_s": statistics.median(r["images_per_s"] for r in results),
                        "steps_per_min": statistics.median(r["steps_per_min"] for r in results),
                        "samples_images_per_s": [round(r["images_per_s"], 3) for r in results]}
    ratios = {
        "busy_with_vs_without": figures["busy/with"]["images_per_s"] / figures["busy/without"]["images_per_s"],
        "idle_with_vs_without": figures["idle/with"]["images_per_s"] / figures["idle/without"]["images_per_s"],
        "with_busy_vs_idle": figures["busy/with"]["images_per_s"] / figures["idle/with"]["images_per_s"],
        "without_busy_vs_idle": figures["busy/without"]["images_per_s"] / figures["idle/without"]["images_per_s"],
        **{f"spin={n}_busy_vs_idle": figures[f"busy/spin={n}"]["images_per_s"] / figures[f"idle/spin={n}"]["images_per_s"]
           for n in args.spincounts},
    }
    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": {"model": args.model, "size": args.size, "batch_size": args.batch_size,
                     "seconds_per_row": args.seconds, "rounds": args.rounds, "cpu_count": os.cpu_count(),
                     "spincounts": list(args.spincounts)},
        "load_average": {"start": load_start, "end": load_average()},
        "rows": figures,
        "ratios": ratios,
        "command": " ".join([".venv/bin/python", "benchmarks/thread_setup.py", *sys.argv[1:]]),
    }


def format_table(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [f"{s['model']} training step, {s['size']}², batch {s['batch_size']} "
             f"(load average start {results['load_average']['start']}, end {results['load_average']['end']})",
             "| competing busy process | anomorph threading setup | threads | OMP_WAIT_POLICY | GOMP_SPINCOUNT | "
             "images/s | steps/min | samples (img/s) |",
             "|---|---|---|---|---|---|---|---|"]
    for key, f in results["rows"].items():
        busy, mode = key.split("/")
        samples = ", ".join(f"{v:.1f}" for v in f.get("samples_images_per_s", []))
        lines.append(f"| {'1 spinner' if busy == 'busy' else 'none'} | {mode} | {f['torch_threads']} | "
                     f"{f['omp_wait_policy'] or 'unset'} | {f.get('gomp_spincount') or 'unset'} | "
                     f"{f['images_per_s']:.2f} | {f['steps_per_min']:.0f} | {samples} |")
    r = results["ratios"]
    lines.append("")
    lines.append(f"busy: with / without = {r['busy_with_vs_without']:.2f}x; idle: with / without = "
                 f"{r['idle_with_vs_without']:.2f}x; busy / idle: with {r['with_busy_vs_idle']:.2f}, "
                 f"without {r['without_busy_vs_idle']:.2f}"
                 + "".join(f", {key.split('_')[0]} {value:.2f}" for key, value in r.items() if key.startswith("spin=")))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ae", choices=("ae", "vae", "morphaeus"))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per row (default 8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the 4 rows, alternating (default 1)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH")
    parser.add_argument("--spincounts", type=int, nargs="*", default=[], metavar="N",
                        help="extra rows: anomorph's setup with GOMP_SPINCOUNT=N (libgomp: it overrides "
                             "OMP_WAIT_POLICY; PASSIVE is 0, the default 300000)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.model, args.size, args.batch_size, args.seconds, args.warmup)))
        return 0
    results = run(args)
    print(format_table(results))
    if args.json is not None:
        from anomorph.data.io import write_json

        print(f"wrote {write_json(args.json, results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
