"""An instrumented server round, driven from outside the runner.

:class:`RoundHarness` starts client-worker actors the way the runner's actor backend does
(the same :class:`~dplora_ray.federated.client.ClientWorker`, the same Ray options, the
data shared once through the object store) plus a small aggregator actor (the library's
:func:`~dplora_ray.federated.aggregator.fedavg`), and runs rounds in the runner's order:
get the global state -> client work -> aggregate -> evaluate every worker's test shard ->
write ``rounds.parquet`` / ``clients.parquet``. The client work is dispatched in one of
two ways:

* ``per_worker``: one call per worker with its list of jobs (the cohort split
  round-robin), results passed straight to the aggregator (the first engine's design);
* ``per_client``: one call per client with two returns (metrics to the driver, update to
  the aggregator), gathered one by one with ``ray.wait`` (the design that lets the runner
  retry or drop single clients).

The actors are thin subclasses that record wall-clock time (``time.time()``, comparable
across processes on one host) when a call enters and leaves, and count training tokens.
From those marks the wall time of a round splits exactly (a telescoping sum along the
worker the round waited for) into the ideal time plus: start latency, per-call overhead,
gaps between calls, hand-over to the aggregation, aggregation, return to the driver,
evaluation overhead, logging, and the critical-path term (the worker the round waited for
was not the busiest one).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import actor_options
from dplora_ray.federated.aggregator import fedavg
from dplora_ray.federated.client import ClientJob, ClientWorker
from dplora_ray.privacy.streams import NoiseKey

__all__ = ["DISPATCH_MODES", "BenchAggregator", "RoundHarness", "RoundTiming",
           "TimedClientWorker"]

DISPATCH_MODES = ("per_worker", "per_client")


class TimedClientWorker(ClientWorker):
    """ClientWorker that stamps each remote call and counts training tokens."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tokens = 0
        self._padded_tokens = 0

    def _loss(self, idx: np.ndarray) -> Any:
        lens = self.data.train.lengths()[np.asarray(idx, dtype=np.int64)]
        self._tokens += int(lens.sum())
        self._padded_tokens += int(len(idx) * (lens.max() if len(idx) else 0))
        return super()._loss(idx)

    def _stamp(self, results: list[Any], enter: float) -> None:
        leave = time.time()
        for r in results:
            r.extras.update(call_enter=enter, call_exit=leave, call_tokens=self._tokens,
                            call_padded_tokens=self._padded_tokens)

    def timed_train_clients(self, global_state: Any, jobs: list[ClientJob]) -> list[Any]:
        enter = time.time()
        self._tokens = self._padded_tokens = 0
        results = self.train_clients(global_state, jobs)
        self._stamp(results, enter)
        return results

    def timed_run_client(self, global_state: Any, job: ClientJob) -> tuple[Any, Any]:
        enter = time.time()
        self._tokens = self._padded_tokens = 0
        result = self.train_client(global_state, job)
        self._stamp([result], enter)
        return dataclasses.replace(result, update=None), result.update

    def noop_client(self, global_state: Any, job: ClientJob) -> tuple[int, None]:
        """Same arguments and two returns as a client call, no work: Ray's own cost."""
        return job.client_id, None

    def timed_evaluate(self, state: Any, index: np.ndarray) -> tuple[Any, Any, float, float]:
        enter = time.time()
        losses, preds = self.evaluate(state, index)
        return losses, preds, enter, time.time()


class BenchAggregator:
    """Holds the global state; FedAvg (example-weighted mean) of the accepted updates."""

    def __init__(self, initial: dict[str, Any]) -> None:
        self.initial = {k: v.float().clone() for k, v in sorted(initial.items())}
        self.state = dict(self.initial)

    def get_state(self) -> dict[str, Any]:
        return self.state

    def reset(self) -> None:
        self.state = dict(self.initial)

    def _step(self, updates: list[Any], weights: list[float]) -> None:
        if updates:
            agg = fedavg(updates, weights)
            self.state = {k: v + agg[k] for k, v in self.state.items()}

    def aggregate_results(self, *worker_results: list[Any]) -> dict[str, Any]:
        enter = time.time()
        results = sorted((r for rs in worker_results for r in rs), key=lambda r: r.client_id)
        ok = [r for r in results if r.update is not None]
        self._step([r.update for r in ok], [r.num_examples for r in ok])
        metas = [dataclasses.replace(r, update=None) for r in results]
        return {"results": metas, "t_enter": enter, "t_exit": time.time()}

    def aggregate_updates(self, num_examples: list[int], *updates: Any) -> tuple[float, float]:
        enter = time.time()
        ok = [(u, n) for u, n in zip(updates, num_examples) if u is not None]
        self._step([u for u, _ in ok], [n for _, n in ok])
        return enter, time.time()


@dataclass
class RoundTiming:
    """Marks of one round (seconds). ``parts`` sums to ``wall - ideal``."""

    server_round: int
    mode: str
    num_clients: int
    wall: float
    ideal: float
    train_by_worker: dict[int, float]
    eval_by_worker: dict[int, float]
    parts: dict[str, float] = field(default_factory=dict)
    dispatch: float = 0.0  # driver-side submit time (inside the start latency)
    tokens: int = 0
    padded_tokens: int = 0
    results: list[Any] = field(default_factory=list, repr=False)

    @property
    def ratio(self) -> float:
        return self.wall / self.ideal if self.ideal > 0 else math.nan


class RoundHarness:
    """Client-worker actors + an aggregator actor, driven round by round.

    Args:
        ray: the imported ``ray`` module (initialised).
        cfg: the experiment config.
        data: the encoded data (shared once through the object store).
        out_dir: where the per-round Parquet files go (the logging cost).
    """

    def __init__(self, ray: Any, cfg: Any, data: Any, out_dir: str | Path) -> None:
        from dplora_ray.config import config_to_dict

        self.ray, self.cfg, self.data = ray, cfg, data
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        remote = ray.remote(TimedClientWorker).options(**actor_options(cfg))
        data_ref = ray.put(data)
        cfg_dict = config_to_dict(cfg)
        self.workers = [remote.remote(cfg_dict, data_ref, i)
                        for i in range(cfg.runtime.num_workers)]
        ray.get([w.ping.remote() for w in self.workers])
        self.startup_seconds = time.perf_counter() - t
        init_full = ray.get(self.workers[0].initial_state.remote())
        keys = ray.get(self.workers[0].trainable_keys.remote())
        self.aggregator = ray.remote(BenchAggregator).options(num_cpus=0).remote(
            {k: init_full[k] for k in keys})
        test_index = np.arange(len(data.test))
        self.eval_shards = [s for s in np.array_split(test_index, len(self.workers)) if len(s)]
        self.round_rows: list[dict[str, Any]] = []
        self.client_rows: list[dict[str, Any]] = []

    def reset(self) -> None:
        """Global state back to the initial adapter."""
        self.ray.get(self.aggregator.reset.remote())

    def shutdown(self) -> None:
        for a in [*self.workers, self.aggregator]:
            self.ray.kill(a)
        self.workers = []

    # ------------------------------------------------------------------ client work
    def _per_worker(self, workers: list[Any], jobs: list[ClientJob], server_round: int
                    ) -> tuple[list[Any], float, float, float, float]:
        ray = self.ray
        state_ref = self.aggregator.get_state.remote()
        split: list[list[ClientJob]] = [[] for _ in workers]
        for pos, job in enumerate(jobs):
            split[pos % len(workers)].append(job)
        futs = [w.timed_train_clients.remote(state_ref, js) for w, js in zip(workers, split)
                if js]
        agg_fut = self.aggregator.aggregate_results.remote(*futs)
        t_dispatched = time.time()
        agg = ray.get(agg_fut)
        return agg["results"], t_dispatched, agg["t_enter"], agg["t_exit"], time.time()

    def _per_client(self, workers: list[Any], jobs: list[ClientJob], server_round: int
                    ) -> tuple[list[Any], float, float, float, float]:
        ray = self.ray
        state_ref = self.aggregator.get_state.remote()
        pending: dict[Any, Any] = {}
        for pos, job in enumerate(jobs):
            call = workers[pos % len(workers)].timed_run_client.options(num_returns=2)
            meta, update = call.remote(state_ref, job)
            pending[meta] = update
        t_dispatched = time.time()
        metas, updates = [], {}
        while pending:  # gathered one by one, as the runner does
            ready, _ = ray.wait(list(pending), num_returns=1)
            for f in ready:
                m = ray.get(f)
                metas.append(m)
                updates[m.client_id] = pending.pop(f)
        metas.sort(key=lambda m: m.client_id)
        ok = [m for m in metas if m.status == "ok"]
        enter, leave = ray.get(self.aggregator.aggregate_updates.remote(
            [m.num_examples for m in ok], *[updates[m.client_id] for m in ok]))
        return metas, t_dispatched, enter, leave, time.time()

    # ------------------------------------------------------------------ one round
    def run_round(self, server_round: int, cohort: np.ndarray, parts: list[np.ndarray],
                  seeds: list[int], *, mode: str = "per_worker", use_workers: int | None = None,
                  evaluate: bool = True, log: bool = True) -> RoundTiming:
        """One round in the runner's order; returns its timing marks."""
        from dplora_ray import results as R
        from dplora_ray.data.metrics import f1_macro

        if mode not in DISPATCH_MODES:
            raise ValueError(f"mode must be one of {DISPATCH_MODES}, got {mode!r}")
        workers = self.workers[:use_workers] if use_workers else self.workers
        jobs = [ClientJob(client_id=int(c), indices=parts[int(c)], seed=s,
                          noise_key=NoiseKey.generate())
                for c, s in zip(cohort, seeds)]
        t0 = time.time()
        run = self._per_worker if mode == "per_worker" else self._per_client
        results, t_dispatched, agg_enter, agg_exit, t_back = run(workers, jobs, server_round)
        eval_by_worker: dict[int, float] = {}
        t_eval = t_back
        ev = (math.nan,) * 3
        if evaluate:
            sref = self.aggregator.get_state.remote()
            outs = self.ray.get([self.workers[i].timed_evaluate.remote(sref, shard)
                                 for i, shard in enumerate(self.eval_shards)])
            losses = np.concatenate([o[0] for o in outs])
            preds = np.concatenate([o[1] for o in outs])
            y = self.data.test.labels
            ev = (float(losses.mean()), float((preds == y).mean()),
                  f1_macro(y, preds, self.data.num_labels))
            eval_by_worker = {i: o[3] - o[2] for i, o in enumerate(outs)}
            t_eval = time.time()
        if log:
            self._log(server_round, cohort, results, ev, t_eval - t0)
            R.write_rounds(self.round_rows, self.out / "rounds.parquet")
            R.write_clients(self.client_rows, self.out / "clients.parquet")
        t_logged = time.time()
        return self._timing(server_round, mode, len(cohort), results, eval_by_worker,
                            t0, t_dispatched, agg_enter, agg_exit, t_back, t_eval, t_logged)

    def _timing(self, server_round: int, mode: str, n: int, results: list[Any],
                eval_by_worker: dict[int, float], t0: float, t_dispatched: float,
                agg_enter: float, agg_exit: float, t_back: float, t_eval: float,
                t_logged: float) -> RoundTiming:
        train: dict[int, float] = {}
        calls: dict[int, dict[tuple[float, float], tuple[int, int]]] = {}
        for x in results:
            train[x.worker] = train.get(x.worker, 0.0) + x.seconds
            e = x.extras
            calls.setdefault(x.worker, {})[(e["call_enter"], e["call_exit"])] = (
                e["call_tokens"], e["call_padded_tokens"])
        busiest = {w: train.get(w, 0.0) + eval_by_worker.get(w, 0.0)
                   for w in set(train) | set(eval_by_worker)}
        ideal = max(busiest.values())
        last = max(calls, key=lambda w: max(c[1] for c in calls[w]))  # waited for
        spans = sorted(calls[last])
        in_calls = sum(b - a for a, b in spans)
        gaps = sum(spans[i + 1][0] - spans[i][1] for i in range(len(spans) - 1))
        eval_compute = max(eval_by_worker.values()) if eval_by_worker else 0.0
        parts = {
            "start latency": spans[0][0] - t0,
            "per-call overhead in the worker": in_calls - train[last],
            "gaps between calls on a worker": gaps,
            "hand-over to the aggregation": agg_enter - spans[-1][1],
            "aggregation (fedavg)": agg_exit - agg_enter,
            "aggregator -> driver": t_back - agg_exit,
            "evaluation overhead": (t_eval - t_back) - eval_compute,
            "logging (Parquet writes)": t_logged - t_eval,
            "critical path vs ideal": train[last] + eval_compute - ideal,
        }
        toks = [v for c in calls.values() for v in c.values()]
        return RoundTiming(
            server_round=server_round, mode=mode, num_clients=n, wall=t_logged - t0,
            ideal=ideal, train_by_worker=train, eval_by_worker=eval_by_worker, parts=parts,
            dispatch=t_dispatched - t0, tokens=sum(t[0] for t in toks),
            padded_tokens=sum(t[1] for t in toks), results=results)

    def _log(self, r: int, cohort: np.ndarray, results: list[Any],
             ev: tuple[float, float, float], seconds: float) -> None:
        from dplora_ray import results as R

        for x in results:
            self.client_rows.append({
                R.SERVER_ROUND: r, R.CLIENT_ID: x.client_id, R.WORKER: x.worker,
                R.STATUS: x.status, R.NUM_EXAMPLES: x.num_examples,
                R.TRAIN_LOSS: x.train_loss, R.UPDATE_NORM: x.update_norm,
                R.BYTES_UP: x.bytes_up, R.BYTES_DOWN: x.bytes_up, R.SECONDS: x.seconds,
                R.STEPS: x.steps, R.SAMPLING_RATE: x.sampling_rate, R.EPSILON: None})
        losses = [x.train_loss for x in results if math.isfinite(x.train_loss)]
        self.round_rows.append({
            R.SERVER_ROUND: r, R.TRAIN_LOSS: float(np.mean(losses)) if losses else math.nan,
            R.EVAL_LOSS: ev[0], R.EVAL_ACCURACY: ev[1], R.EVAL_F1_MACRO: ev[2],
            R.NUM_CLIENTS_SAMPLED: len(cohort), R.NUM_CLIENTS_COMPLETED: len(results),
            R.BYTES_UP: sum(x.bytes_up for x in results), R.BYTES_DOWN: 0,
            R.ROUND_SECONDS: seconds, R.EPSILON: None, R.EPSILON_MEAN: None,
            R.NOISE_MULTIPLIER: None})
