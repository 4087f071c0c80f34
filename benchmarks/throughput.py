"""Throughput: client updates per second (tiny model) and training tokens per second per
worker (SmolLM2-135M; the tiny model under ``--quick``), with 1 and 2 worker actors.

Both come from rounds of the instrumented harness without evaluation or logging: with
"1 worker" every job goes to worker 0 (the other actor idles), with "2 workers" the
cohort is split round-robin. Definitions:

* ``client_updates_per_second`` = clients in the round / wall time of the round
  (dispatch -> every update aggregated).
* ``tokens_per_second_per_worker`` = training tokens (real, unpadded; forward + backward)
  processed in the round / wall time / number of workers used. The compute-only rate
  (tokens / the worker's summed client ``seconds``) is reported beside it.

The token benchmark feeds fixed-length random token sequences (every example exactly
``length`` tokens), so a step at batch 8 is exactly 8 x ``length`` tokens.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import fixed_length_data, median, tiny_config
from benchmarks.harness import RoundHarness, RoundTiming

__all__ = ["model_vocab_size", "smollm2_config", "tokens_per_second", "updates_per_second"]

TOKEN_LENGTH = 128
TOKEN_BATCH = 8


def _rate(timings: list[RoundTiming], workers: int) -> dict[str, float]:
    wall = sum(t.wall for t in timings)
    train = [sum(t.train_by_worker.values()) for t in timings]
    return {
        "client_updates_per_second": sum(t.num_clients for t in timings) / wall,
        "tokens_per_second_per_worker": sum(t.tokens for t in timings) / wall / workers,
        "tokens_per_compute_second": sum(t.tokens for t in timings) / sum(train),
        "mean_round_wall_seconds": wall / len(timings),
        "rounds": len(timings),
    }


def _measure(harness: RoundHarness, cohort: np.ndarray, parts: list[np.ndarray],
             reps: int, mode: str) -> dict[str, dict[str, float]]:
    """Alternate 1-worker and 2-worker rounds (so both see the same load)."""
    counts = [1, len(harness.workers)] if len(harness.workers) > 1 else [1]
    timings: dict[int, list[RoundTiming]] = {n: [] for n in counts}
    for rep in range(reps):
        for n in counts:
            seeds = [1000 * rep + int(c) for c in cohort]
            harness.reset()
            timings[n].append(harness.run_round(rep + 1, cohort, parts, seeds, mode=mode,
                                                use_workers=n, evaluate=False, log=False))
    return {str(n): _rate(ts, n) for n, ts in timings.items()}


def updates_per_second(harness: RoundHarness, plan: Any, quick: bool) -> dict[str, Any]:
    """Client updates per second on the round-overhead harness (tiny model), both
    dispatch modes; the headline is ``per_client`` (the runner's current mode)."""
    cohort = plan.cohorts[0]
    reps = 1 if quick else 2
    modes = {m: _measure(harness, cohort, plan.parts, reps, m)
             for m in ("per_client", "per_worker")}
    return {
        "model": harness.cfg.model.name,
        "clients_per_round": len(cohort),
        "local_steps": harness.cfg.federation.local_steps,
        "batch_size": harness.cfg.federation.batch_size,
        "by_mode": modes,
        "client_updates_per_second": {n: v["client_updates_per_second"]
                                      for n, v in modes["per_client"].items()},
        "tokens_per_second_per_worker": {n: v["tokens_per_second_per_worker"]
                                         for n, v in modes["per_client"].items()},
    }


def smollm2_config(model: str = "smollm2-135m", gpus_per_worker: float = 0.0,
                   num_workers: int = 2) -> Any:
    """SmolLM2-135M, LoRA r=8 on q/v, batch 8, no privacy, 1 CPU thread per worker."""
    return tiny_config({
        "model.name": model, "model.max_length": TOKEN_LENGTH,
        "lora.r": 8, "lora.alpha": 16.0, "lora.target_modules": ["q_proj", "v_proj"],
        "federation.batch_size": TOKEN_BATCH, "federation.local_steps": 2,
        "federation.learning_rate": 2e-3, "federation.optimizer": "adamw",
        "runtime.num_workers": num_workers, "runtime.cpus_per_worker": 1.0,
        "runtime.torch_threads": 1, "runtime.gpus_per_worker": gpus_per_worker,
    })


def tokens_per_second(ray: Any, quick: bool, workdir: Path, *, gpus_per_worker: float = 0.0,
                      harness: RoundHarness | None = None, plan: Any = None) -> dict[str, Any]:
    """Training tokens per second per worker.

    Full mode: SmolLM2-135M on fixed-length data, on its own actors. With ``harness``
    and ``plan`` given (``--quick``), the already running tiny-model harness and its
    synthetic data are used instead (the tokens are counted, so lengths need not be
    fixed); nothing new is started.
    """
    from dplora_ray.federated.client import ClientJob, tensor_bytes

    own = harness is None
    clients_per_worker = 2
    if own:
        model = "tiny-llama" if quick else "smollm2-135m"
        cfg = smollm2_config(model, gpus_per_worker)
        n_clients = 2 * clients_per_worker
        data = fixed_length_data(model_vocab_size(cfg), TOKEN_LENGTH,
                                 n_train=n_clients * TOKEN_BATCH, n_test=4,
                                 label_token_ids=(100, 200, 300))
        parts = [np.arange(c * TOKEN_BATCH, (c + 1) * TOKEN_BATCH) for c in range(n_clients)]
        cohort = np.arange(n_clients)
        t = time.perf_counter()
        harness = RoundHarness(ray, cfg, data, workdir / "tokens")
        load_seconds = time.perf_counter() - t
    else:
        cfg, parts = harness.cfg, plan.parts
        model = cfg.model.name
        cohort = plan.cohorts[0][:2 * clients_per_worker]
        load_seconds = 0.0
    try:
        # warm-up: one client per worker (first steps allocate); keep a full result to
        # measure the real payload
        state = ray.get(harness.aggregator.get_state.remote())
        warm = ray.get([w.train_client.remote(state, ClientJob(
            client_id=int(cohort[i]), indices=parts[int(cohort[i])], seed=7))
            for i, w in enumerate(harness.workers)])
        payload = _payload(warm[0].update, tensor_bytes)
        rates = {"1": _measure_tokens(harness, cohort[:clients_per_worker], parts, 1),
                 "2": _measure_tokens(harness, cohort, parts, 2)}
    finally:
        if own:
            harness.shutdown()
    label = "SmolLM2-135M, batch 8 x 128 tokens" if model == "smollm2-135m" else (
        f"{model} (quick mode, not SmolLM2)" if quick else model)
    return {
        "model": model,
        "label": label,
        "data": "fixed-length random tokens" if own else "the round-overhead synthetic data",
        "batch_size": cfg.federation.batch_size,
        "local_steps": cfg.federation.local_steps,
        "clients_per_worker": clients_per_worker,
        "threads_per_worker": cfg.runtime.threads,
        "gpus_per_worker": gpus_per_worker,
        "worker_start_and_model_load_seconds": load_seconds,
        "by_workers": rates,
        "tokens_per_second_per_worker": {n: v["tokens_per_second_per_worker"]
                                         for n, v in rates.items()},
        "real_payload": payload,
    }


def model_vocab_size(cfg: Any) -> int:
    """The base model's vocabulary size (from its prepared checkpoint's config.json)."""
    import json

    from dplora_ray.models import prepare_model

    return int(json.loads((Path(prepare_model(cfg.model)) / "config.json").read_text())
               ["vocab_size"])


def _measure_tokens(harness: RoundHarness, cohort: np.ndarray, parts: list[np.ndarray],
                    workers: int) -> dict[str, float]:
    seeds = [11 + int(c) for c in cohort]
    harness.reset()
    timing = harness.run_round(1, cohort, parts, seeds, mode="per_worker", use_workers=workers,
                               evaluate=False, log=False)
    rate = _rate([timing], workers)
    rate["tokens"] = timing.tokens
    rate["step_seconds_median"] = median([x.seconds / max(1, x.steps) for x in timing.results])
    return rate


def _payload(update: Any, tensor_bytes: Any) -> dict[str, Any]:
    """Serialised size of a real client update (pickle protocol 5, as Ray uses)."""
    import pickle

    raw = tensor_bytes(update)
    size = len(pickle.dumps(update, protocol=5))
    return {"tensors": len(update), "raw_bytes": raw, "serialized_bytes": size,
            "overhead_fraction": (size - raw) / raw, "type": type(update).__name__}
