"""Memory and start-up time vs the number of virtual clients in the population.

Each population runs in a fresh Python process (``python -m benchmarks.memory``) that
starts its own local Ray instance and a real
:func:`~dplora_ray.federated.runner.run_experiment` (tiny model, 10 clients per round, 2
worker actors, the same 20,000 synthetic training examples for every population, so
only the population changes). A background thread sums the RSS of that process and all
its descendants (Ray's GCS and raylet, the worker actors, the aggregator, idle Ray
workers) every 0.1 s; the peak and its split by role are reported. Start-up time is
read from the runner's log lines: planning (data, partition, cohort schedule, privacy
plan) ends at "starting ... backend", and the first round can start after the
"eval before training" line.

Target: 10,000 clients cost at most 1.25x the memory of 10. ``--quick`` uses 10 and
1,000 clients, 2,000 examples and the ``inline`` backend (no Ray: one process).

RSS counts shared pages (the torch libraries mapped by every worker) in every process,
so the absolute sum overstates what the machine loses; it is the same for every
population, which is what the ratio compares.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, MemorySampler, private_ray, set_default_env, tiny_config

__all__ = ["TARGET", "measure", "run_population"]

TARGET = 1.25


def population_config(num_clients: int, quick: bool) -> Any:
    return tiny_config({
        "data.max_train_examples": 2000 if quick else 20000,
        "federation.num_clients": num_clients, "federation.clients_per_round": 10,
        "federation.rounds": 2 if quick else 3, "federation.eval_every": 3,
        "runtime.backend": "inline" if quick else "actors", "runtime.num_workers": 2,
    })


def run_population(num_clients: int, quick: bool) -> dict[str, Any]:
    """One run in this process (call it in a fresh process; see :func:`measure`)."""
    set_default_env()
    from dplora_ray.federated.runner import run_experiment

    cfg = population_config(num_clients, quick)
    marks: list[tuple[float, str]] = []
    with tempfile.TemporaryDirectory(prefix="dplora-mem-") as tmp:
        ray_ctx = private_ray() if cfg.runtime.backend == "actors" else nullcontext()
        t_ray = time.perf_counter()
        with ray_ctx:
            ray_seconds = time.perf_counter() - t_ray
            with MemorySampler(interval=0.1) as sampler:
                baseline = sampler.last_bytes
                t0 = time.perf_counter()
                summary = run_experiment(
                    cfg, Path(tmp) / "run", overwrite=True, progress=False,
                    log=lambda m: marks.append((time.perf_counter() - t0, m)))
                wall = time.perf_counter() - t0
    planned = next((t for t, m in marks if m.startswith("starting")), float("nan"))
    ready = next((t for t, m in marks if m.startswith("eval before training")),
                 float("nan"))
    return {
        "num_clients": num_clients,
        "backend": cfg.runtime.backend,
        "train_examples": summary.get("num_train_examples"),
        "rounds": summary.get("rounds_completed"),
        "peak_rss_bytes": sampler.peak_bytes,
        "peak_rss_by_role": sampler.peak_roles,
        "peak_processes": sampler.peak_processes,
        "baseline_rss_bytes": baseline,
        "samples": sampler.samples,
        "ray_start_seconds": ray_seconds if cfg.runtime.backend == "actors" else 0.0,
        "plan_seconds": planned,
        "startup_seconds": ready,
        "run_seconds": wall,
    }


def measure(quick: bool) -> dict[str, Any]:
    """Each population in its own process; the ratio of the largest to the smallest."""
    populations = (10, 1000) if quick else (10, 1000, 10000)
    runs = []
    for n in populations:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
            path = fh.name
        try:
            cmd = [sys.executable, "-m", "benchmarks.memory", "--num-clients", str(n),
                   "--json", path] + (["--quick"] if quick else [])
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(REPO)})
            if proc.returncode != 0:
                raise RuntimeError(f"memory run with {n} clients failed "
                                   f"(exit {proc.returncode}): {proc.stderr[-2000:]}")
            runs.append(json.loads(Path(path).read_text()))
        finally:
            Path(path).unlink(missing_ok=True)
    small, large = runs[0], runs[-1]
    ratio = large["peak_rss_bytes"] / small["peak_rss_bytes"]
    return {
        "populations": list(populations),
        "ratio": ratio,
        "ratio_label": f"{populations[-1]} vs {populations[0]} clients"
                       + (" (quick: inline backend)" if quick else ""),
        "target": TARGET,
        "met": ratio <= TARGET,
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="one memory run (used by python -m benchmarks)")
    p.add_argument("--num-clients", type=int, required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    result = run_population(args.num_clients, args.quick)
    Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
