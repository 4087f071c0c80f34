"""Round overhead: wall time of a server round / the ideal time.

The ideal is the busiest worker's own compute in that round: the summed ``seconds`` of the
clients it trained plus its share of the evaluation (measured inside the worker). Target:
at most 1.10 with the tiny model, 64 virtual clients per round, 2 worker actors.

Two measurements:

* a real :func:`~dplora_ray.federated.runner.run_experiment` (the headline figure, since
  it is what users get): ``rounds.parquet`` ``round_seconds`` over, per worker, the sum of
  its clients' ``seconds`` in ``clients.parquet`` plus its evaluation time. The runner
  does not record evaluation time per worker, so that term comes from the harness (same
  config, same test split, measured inside the workers). ``round_seconds`` stops before
  the checkpoint and Parquet writes of the round; ``all_inclusive_ratio`` adds them back
  (time from the first round's start to the end of the run, over the summed ideal).
* the instrumented harness (:mod:`benchmarks.harness`), in both dispatch modes, with
  timestamps at every hand-over, so the overhead splits into start latency, per-call
  overhead, gaps between calls, hand-over to the aggregation, aggregation, return to the
  driver, evaluation overhead and logging.

Round 1 is a warm-up (first calls import and allocate) and is not counted in either.
"""

from __future__ import annotations

import math
import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import median, tiny_config
from benchmarks.harness import DISPATCH_MODES, RoundHarness, RoundTiming

__all__ = ["TARGET", "cross_check_with_runner", "measure", "settings"]

TARGET = 1.10


def settings(quick: bool) -> dict[str, Any]:
    """Config overrides (dotted keys) for the benchmark's tiny run."""
    if quick:
        return {"federation.num_clients": 32, "federation.clients_per_round": 16,
                "federation.rounds": 3, "data.max_train_examples": 1000}
    return {"federation.num_clients": 128, "federation.clients_per_round": 64,
            "federation.rounds": 7, "data.max_train_examples": 4000}


def make_config(quick: bool) -> Any:
    return tiny_config({**settings(quick), "federation.eval_every": 1,
                        "runtime.num_workers": 2, "runtime.backend": "actors"})


def _serialization_cost(ray: Any, harness: RoundHarness, plan: Any, cfg: Any
                        ) -> dict[str, Any]:
    """Offline cost of pickling what one round moves: the jobs out, and the results with
    their updates back (one real result from a worker, times the cohort size)."""
    from dplora_ray.federated.client import ClientJob
    from dplora_ray.federated.runner import derive_seed

    cohort = plan.cohorts[-1]
    jobs = [ClientJob(client_id=int(c), indices=plan.parts[int(c)],
                      seed=derive_seed(cfg.seed, 2, 99, int(c))) for c in cohort]
    state = ray.get(harness.aggregator.get_state.remote())
    one = ray.get(harness.workers[0].train_client.remote(state, jobs[0]))
    out: dict[str, Any] = {}
    for name, objs in (("jobs", jobs), ("results", [one] * len(jobs))):
        t = time.perf_counter()
        size = 0
        for obj in objs:  # one by one: pickle would store a repeated object once
            blob = pickle.dumps(obj, protocol=5)
            pickle.loads(blob)
            size += len(blob)
        out[f"{name}_dumps_loads_seconds"] = time.perf_counter() - t
        out[f"{name}_bytes"] = size
    out["update_type"] = type(one.update).__name__
    return out


def _call_overhead(ray: Any, harness: RoundHarness, plan: Any, n: int = 32
                   ) -> dict[str, float]:
    """Ray's own cost per call on one worker: ``ping`` (no arguments), and a no-op with a
    client call's arguments (the global state ref + a job) and its two returns; plus the
    unpickling of the global state that every client call pays."""
    from dplora_ray.federated.client import ClientJob

    w = harness.workers[0]
    ray.get(w.ping.remote())
    t = time.perf_counter()
    ray.get([w.ping.remote() for _ in range(n)])
    ping = (time.perf_counter() - t) / n
    state_ref = harness.aggregator.get_state.remote()
    cohort = plan.cohorts[0][:n]
    jobs = [ClientJob(client_id=int(c), indices=plan.parts[int(c)], seed=1) for c in cohort]
    ray.get([w.noop_client.options(num_returns=2).remote(state_ref, jobs[0])[0]])
    t = time.perf_counter()
    refs = [w.noop_client.options(num_returns=2).remote(state_ref, j) for j in jobs]
    ray.get([r[0] for r in refs] + [r[1] for r in refs])
    noop = (time.perf_counter() - t) / len(jobs)
    from dplora_ray.federated.client import PackedUpdate

    state = ray.get(state_ref)
    unpickle = {}
    for name, obj in (("plain_dict", dict(state)), ("packed", PackedUpdate(state))):
        blob = pickle.dumps(obj, protocol=5)
        times = []
        for _ in range(21):
            t = time.perf_counter()
            pickle.loads(blob)
            times.append(time.perf_counter() - t)
        unpickle[name] = (median(times), len(blob))
    return {"ping_seconds": ping, "noop_client_call_seconds": noop,
            "state_unpickle_seconds": unpickle["plain_dict"][0],
            "state_bytes": unpickle["plain_dict"][1],
            "state_unpickle_seconds_if_packed": unpickle["packed"][0],
            "state_tensors": len(state)}


def _summary(timings: list[RoundTiming], cfg: Any) -> dict[str, Any]:
    counted = timings[1:] if len(timings) > 1 else timings  # round 1 warms up
    wall = sum(t.wall for t in counted)
    ideal = sum(t.ideal for t in counted)
    mean_ideal = ideal / len(counted)
    mean_parts = {k: float(np.mean([t.parts[k] for t in counted])) for k in counted[0].parts}
    return {
        "ratio": wall / ideal,
        "ratio_median_round": median([t.ratio for t in counted]),
        "rounds_counted": len(counted),
        "mean_round_wall_seconds": wall / len(counted),
        "mean_round_ideal_seconds": mean_ideal,
        "mean_client_seconds": float(np.mean([x.seconds for t in counted
                                              for x in t.results])),
        "mean_eval_seconds_by_worker": {
            str(w): float(np.mean([t.eval_by_worker.get(w, 0.0) for t in counted]))
            for w in range(cfg.runtime.num_workers)},
        "overhead_seconds": mean_parts,
        "overhead_fraction_of_ideal": {k: v / mean_ideal for k, v in mean_parts.items()},
        "dispatch_seconds": float(np.mean([t.dispatch for t in counted])),
        "per_round": [{"server_round": t.server_round, "wall": t.wall, "ideal": t.ideal,
                       "ratio": t.ratio} for t in timings],
    }


def measure(ray: Any, quick: bool, workdir: Path) -> tuple[dict[str, Any], RoundHarness, Any]:
    """Run the harness rounds in both dispatch modes (interleaved, so both see the same
    machine load); returns the figures, the live harness and the plan (the throughput
    benchmark reuses both; the caller shuts the harness down)."""
    from dplora_ray.federated.runner import derive_seed, plan_run

    cfg = make_config(quick)
    plan = plan_run(cfg)
    harness = RoundHarness(ray, cfg, plan.data, workdir / "harness")
    timings: dict[str, list[RoundTiming]] = {m: [] for m in DISPATCH_MODES}
    for r, cohort in enumerate(plan.cohorts, start=1):
        seeds = [derive_seed(cfg.seed, 2, r, int(c)) for c in cohort]
        for mode in DISPATCH_MODES:
            timings[mode].append(harness.run_round(r, cohort, plan.parts, seeds, mode=mode))
    result = {
        "model": cfg.model.name,
        "clients_per_round": cfg.federation.clients_per_round,
        "num_workers": cfg.runtime.num_workers,
        "local_steps": cfg.federation.local_steps,
        "batch_size": cfg.federation.batch_size,
        "test_examples": len(plan.data.test),
        "worker_startup_seconds": harness.startup_seconds,
        "serialization_offline": _serialization_cost(ray, harness, plan, cfg),
        "ray_call_overhead": _call_overhead(ray, harness, plan),
        "harness": {m: _summary(ts, cfg) for m, ts in timings.items()},
    }
    return result, harness, plan


class _WriteStamps:
    """Times the runner's per-round writes from outside: while active, the module-level
    writers it calls (``results.write_rounds`` / ``write_clients`` / ``write_json_atomic``
    and the runner's ``_write_checkpoint_atomic``, where present) are wrapped to record
    when they start and end. Only this process's module attributes change, and they are
    restored on exit."""

    NAMES = (("dplora_ray.results", "write_rounds"), ("dplora_ray.results", "write_clients"),
             ("dplora_ray.results", "write_json_atomic"),
             ("dplora_ray.federated.runner", "_write_checkpoint_atomic"))

    def __init__(self) -> None:
        self.stamps: list[tuple[str, float, float]] = []
        self._saved: list[tuple[Any, str, Any]] = []

    def _wrap(self, name: str, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.stamps.append((name, t, time.perf_counter()))
        return timed

    def __enter__(self) -> _WriteStamps:
        import importlib

        for mod_name, attr in self.NAMES:
            mod = importlib.import_module(mod_name)
            fn = getattr(mod, attr, None)
            if fn is not None:
                self._saved.append((mod, attr, fn))
                setattr(mod, attr, self._wrap(attr, fn))
        return self

    def __exit__(self, *exc: Any) -> None:
        for mod, attr, fn in self._saved:
            setattr(mod, attr, fn)

    def round_ends(self) -> list[float]:
        """End of each round's writes: the end of the n-th ``write_clients`` call (the
        runner writes clients.parquet once per round, then once more when it finishes)."""
        return [t1 for name, _, t1 in self.stamps if name == "write_clients"]

    def seconds_between(self, start: float, end: float) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, t0, t1 in self.stamps:
            if start < t1 <= end:
                out[name] = out.get(name, 0.0) + (t1 - t0)
        return out


def cross_check_with_runner(quick: bool, workdir: Path,
                            eval_seconds_by_worker: dict[str, float]) -> dict[str, Any]:
    """The same config through the real runner (on the already running Ray)."""
    import pandas as pd

    from dplora_ray.federated.runner import run_experiment

    cfg = make_config(quick)
    marks: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    out = workdir / "runner"
    with _WriteStamps() as writes:
        summary = run_experiment(cfg, out, overwrite=True, progress=False,
                                 log=lambda m: marks.append((time.perf_counter() - t0, m)))
    t_end = float(summary.get("wall_seconds", time.perf_counter() - t0))
    ends = writes.round_ends()
    rounds = pd.read_parquet(out / "rounds.parquet")
    clients = pd.read_parquet(out / "clients.parquet")
    ratios, walls, ideals, all_ideal = [], [], [], 0.0
    inclusive, write_split = [], []
    for _, row in rounds.iterrows():
        r = int(row["server_round"])
        per_worker = clients[clients["server_round"] == r].groupby("worker")["seconds"].sum()
        ideal = max(float(s) + eval_seconds_by_worker.get(str(int(w)), 0.0)
                    for w, s in per_worker.items())
        all_ideal += ideal
        if r == 1 and len(rounds) > 1:
            continue  # warm-up, as in the harness
        walls.append(float(row["round_seconds"]))
        ideals.append(ideal)
        ratios.append(walls[-1] / ideal)
        if len(ends) > r:  # round r ends with the r-th clients.parquet write
            inclusive.append(ends[r - 1] - ends[r - 2])
            write_split.append(writes.seconds_between(ends[r - 2], ends[r - 1]))
    started = next((t for t, m in marks if m.startswith("starting")), math.nan)
    ready = next((t for t, m in marks if m.startswith("eval before training")), math.nan)
    incl = (sum(inclusive) / sum(ideals)) if len(inclusive) == len(ideals) else math.nan
    names = sorted({k for w in write_split for k in w})
    return {
        "ratio": incl if math.isfinite(incl) else sum(walls) / sum(ideals),
        "ratio_source": ("inclusive: round start to the end of its writes (timed from "
                         "outside)" if math.isfinite(incl) else "round_seconds"),
        "round_seconds_ratio": sum(walls) / sum(ideals),
        "inclusive_ratio": incl,
        "mean_inclusive_round_seconds": (sum(inclusive) / len(inclusive)
                                         if inclusive else math.nan),
        "mean_write_seconds": {k: float(np.mean([w.get(k, 0.0) for w in write_split]))
                               for k in names},
        "ratio_median_round": median(ratios),
        "rounds_counted": len(walls),
        "all_inclusive_ratio": (t_end - ready) / all_ideal,
        "mean_round_seconds": sum(walls) / len(walls),
        "mean_round_ideal_seconds": sum(ideals) / len(ideals),
        "per_round_ratio": ratios,
        "note": "round_seconds stops before the checkpoint and Parquet writes; the "
                "inclusive time runs from one round's last write to the next's; the "
                "evaluation share per worker comes from the harness; all_inclusive_ratio "
                "covers all rounds (warm-up included) plus the final adapter/summary "
                "writes",
        "plan_seconds": started,
        "startup_seconds_to_first_round": ready,
    }
