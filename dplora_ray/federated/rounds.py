"""One round of a run: dispatch the cohort, charge the ledger, gather under the failure
and time policies, aggregate, evaluate, record.

:class:`RoundsMixin` holds the round methods of the runner's ``_Run`` (which owns the
state they use: the plan, the backend, the pool, the ledger, the noise key, the rows).
Every sampled client is charged when the round is dispatched, whatever happens to it
after (docs/privacy.md, "Privacy under failures" in :mod:`dplora_ray.federated.runner`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from dplora_ray import results as R
from dplora_ray.errors import RunFailedError
from dplora_ray.federated.client import ClientJob
from dplora_ray.federated.failure_policy import Decision, decide
from dplora_ray.federated.progress import fmt
from dplora_ray.privacy.mechanisms import client_unit
from dplora_ray.privacy.streams import PublicStream, public_seed
from dplora_ray.results import (
    ACCEPTED_STATUSES,
    STATUS_ABORTED,
    STATUS_DROPPED_FAILURE,
    STATUS_DROPPED_TIMEOUT,
    STATUS_FAILED,
    STATUS_FAILED_RETRIED,
    STATUS_OK,
    STATUS_SKIPPED_IRRELEVANT,
    EvalResult,
)

__all__ = ["STOP_BUDGET", "STOP_COMPLETED", "RoundsMixin"]

STOP_COMPLETED = "completed"
STOP_BUDGET = "privacy_budget"


@dataclass
class _Pending:
    client_id: int
    worker: int
    attempt: int
    payload: Any


@dataclass
class _Outcome:
    status: str
    worker: int
    result: Any = None  # ClientResult without its update
    payload: Any = None  # future of the update (aggregator only)


class RoundsMixin:
    """The round methods of the runner (see the module doc)."""

    # set by the runner (``_Run``)
    cfg: Any
    fed: Any
    rt: Any
    pp: Any
    plan: Any
    backend: Any
    pool: Any
    ledger: Any
    noise_key: Any
    aggregator: Any
    tracker: Any  # dplora_ray.tracking.Tracker
    bar: Any
    down_bytes: int
    last_eval: EvalResult
    last_update_ref: Any
    rounds_rows: list[dict[str, Any]]
    client_rows: list[dict[str, Any]]
    stop_reason: str
    done_rounds: int

    def _note(self, msg: str) -> None:
        raise NotImplementedError

    def evaluate(self, state_ref: Any) -> EvalResult:
        raise NotImplementedError

    def checkpoint(self) -> None:
        raise NotImplementedError

    def write_results(self) -> None:
        raise NotImplementedError

    def run_round(self, r: int, cohort: np.ndarray) -> bool:
        """Run round ``r``; False when the budget guard stops the run before it."""
        cfg, fed, pp, backend = self.cfg, self.fed, self.pp, self.backend
        t0 = time.perf_counter()
        entries = self.plan.ledger_entries(r, cohort)
        budget = pp.budget
        if (budget is not None and entries
                and self.ledger.epsilon_if(entries) > budget * (1 + 1e-9)):
            self.stop_reason = STOP_BUDGET
            self._note(f"round {r}: stopping before it would push epsilon past "
                       f"privacy.max_epsilon={budget}")
            return False
        state_ref = backend.submit(self.aggregator, "get_state")
        # CMFL's reference: the last applied global update (None otherwise)
        self.last_update_ref = (backend.submit(self.aggregator, "get_last_update")
                                if fed.compression == "cmfl" else None)
        jobs = {int(cid): ClientJob(
                    client_id=int(cid), indices=self.plan.parts[int(cid)],
                    seed=public_seed(cfg.seed, PublicStream.CLIENT, r, int(cid)),
                    noise_multiplier=pp.noise_multiplier,
                    noise_key=pp.mechanism.noise_key_for(self.noise_key, "client", r, int(cid)))
                for cid in cohort}
        pending: dict[Any, _Pending] = {}
        ws = self.pool.usable()
        for pos, cid in enumerate(sorted(jobs)):
            w = ws[pos % len(ws)]
            meta, payload = backend.submit_client(w, state_ref, jobs[cid], r, 0,
                                                  self.last_update_ref)
            pending[meta] = _Pending(cid, w, 0, payload)
        for e in entries:  # charged whether or not the client completes
            self.ledger.append(e)
        outcomes = self.gather(r, jobs, pending, state_ref, t0)

        accepted = [cid for cid in sorted(outcomes)
                    if outcomes[cid].status in ACCEPTED_STATUSES]
        backend.get(backend.submit(
            self.aggregator, "step", r, pp.noise_multiplier, float(fed.clients_per_round),
            [len(self.plan.parts[c]) for c in accepted],
            *[outcomes[c].payload for c in accepted]))
        do_eval = (r % fed.eval_every == 0) or r == fed.rounds
        if do_eval:
            self.last_eval = self.evaluate(backend.submit(self.aggregator, "get_state"))
        eps_units = self.ledger.epsilons() if pp.private else {}
        epsilon = max(eps_units.values()) if eps_units else None
        eps_mean = float(np.mean(list(eps_units.values()))) if eps_units else None
        self.add_client_rows(r, outcomes, eps_units, epsilon)
        losses = [outcomes[c].result.train_loss for c in accepted
                  if math.isfinite(outcomes[c].result.train_loss)]
        row = {
            R.SERVER_ROUND: r,
            R.TRAIN_LOSS: float(np.mean(losses)) if losses else math.nan,
            **(self.last_eval if do_eval else EvalResult()).round_columns(),
            R.NUM_CLIENTS_SAMPLED: len(cohort), R.NUM_CLIENTS_COMPLETED: len(accepted),
            R.BYTES_UP: int(sum(o.result.bytes_up for o in outcomes.values()
                                if o.result is not None)),
            R.BYTES_DOWN: self.down_bytes * len(cohort),
            R.ROUND_SECONDS: time.perf_counter() - t0, R.EPSILON: epsilon,
            R.EPSILON_MEAN: eps_mean,
            R.NOISE_MULTIPLIER: pp.noise_multiplier if pp.private else None,
        }
        self.rounds_rows.append(row)
        self.done_rounds = r
        self.checkpoint()  # first the checkpoint, then the files it can rebuild
        self.write_results()
        self.tracker.log_rounds(self.rounds_rows)  # then TensorBoard, MLflow, Ray Tune
        shown = ({"rougeL": fmt(self.last_eval.rouge_l)}
                 if self.plan.data.task_type == "generation"
                 else {"acc": fmt(self.last_eval.accuracy)})
        if self.bar is not None:
            self.bar.update(loss=fmt(row[R.TRAIN_LOSS]), **shown, eps=fmt(epsilon, ".2f"))
        return True

    def add_client_rows(self, r: int, outcomes: dict[int, _Outcome],
                        eps_units: dict[str, float], epsilon: float | None) -> None:
        per_unit = self.pp.mechanism.per_client_epsilon()
        for cid in sorted(outcomes):
            o, x = outcomes[cid], outcomes[cid].result
            row = {
                R.SERVER_ROUND: r, R.CLIENT_ID: cid, R.WORKER: o.worker, R.STATUS: o.status,
                R.NUM_EXAMPLES: len(self.plan.parts[cid]), R.BYTES_DOWN: self.down_bytes,
                R.SAMPLING_RATE: self.plan.client_rate(cid),
                R.EPSILON: eps_units.get(client_unit(cid)) if per_unit else epsilon,
                R.TRAIN_LOSS: math.nan, R.UPDATE_NORM: math.nan, R.BYTES_UP: 0,
                R.SECONDS: math.nan, R.STEPS: 0,
            }
            if x is not None and o.status not in (STATUS_ABORTED, STATUS_FAILED):
                row.update({R.NUM_EXAMPLES: x.num_examples, R.TRAIN_LOSS: x.train_loss,
                            R.UPDATE_NORM: x.update_norm, R.BYTES_UP: x.bytes_up,
                            R.SECONDS: x.seconds, R.STEPS: x.steps,
                            R.SAMPLING_RATE: x.sampling_rate})
            self.client_rows.append(row)
            if o.status not in (STATUS_OK, STATUS_FAILED_RETRIED, STATUS_SKIPPED_IRRELEVANT):
                self._note(f"round {r}: client {cid} {o.status}")

    def gather(self, r: int, jobs: dict[int, ClientJob], pending: dict[Any, _Pending],
               state_ref: Any, t0: float) -> dict[int, _Outcome]:
        """Collect the round's client results, applying the failure and time policies."""
        from dplora_ray.federated.backends import WorkerLost

        backend, rt = self.backend, self.rt
        outcomes: dict[int, _Outcome] = {}
        retried: set[int] = set()
        deadline = None if rt.round_timeout_s is None else t0 + rt.round_timeout_s
        while pending:
            remaining = None if deadline is None else max(0.0, deadline - time.perf_counter())
            ready = backend.wait(list(pending), remaining)
            if not ready:  # the round's time is up: everything still pending is late
                busy = sorted({p.worker for p in pending.values()})
                for p in pending.values():
                    outcomes[p.client_id] = _Outcome(STATUS_DROPPED_TIMEOUT, p.worker)
                pending.clear()
                self._note(f"round {r}: {rt.round_timeout_s:g} s are up; dropping "
                           f"{sum(o.status == STATUS_DROPPED_TIMEOUT for o in outcomes.values())}"
                           f" late client(s), restarting worker(s) {busy}")
                for w in busy:
                    backend.restart_worker(w)
                    self.pool.lost(w)
                break
            for fut in ready:
                p = pending.pop(fut)
                try:
                    res = backend.result(fut)
                except WorkerLost as exc:
                    self.pool.lost(p.worker, exc.permanent)
                    what = (f"round {r}: worker {p.worker} lost while training client "
                            f"{p.client_id} ({exc.reason})")
                    decision = decide(rt, p.attempt)
                    if decision is Decision.RETRY:
                        w = self.pool.next_after(p.worker)
                        meta, payload = backend.submit_client(
                            w, state_ref, jobs[p.client_id], r, p.attempt + 1,
                            self.last_update_ref)
                        pending[meta] = _Pending(p.client_id, w, p.attempt + 1, payload)
                        retried.add(p.client_id)
                        self._note(f"{what}; re-running it on worker {w} "
                                   f"(attempt {p.attempt + 2}, same RNG stream)")
                    elif decision is Decision.DROP:
                        outcomes[p.client_id] = _Outcome(STATUS_DROPPED_FAILURE, p.worker)
                        self._note(f"{what}; dropped from the round "
                                   "(runtime.on_client_failure=drop)")
                    else:
                        self.fail_round(r, p, what, pending, outcomes)
                    continue
                status = res.status
                if p.client_id in retried and status == STATUS_OK:
                    status = STATUS_FAILED_RETRIED
                outcomes[p.client_id] = _Outcome(status, p.worker, res, p.payload)
        return outcomes

    def fail_round(self, r: int, p: _Pending, what: str, pending: dict[Any, _Pending],
                   outcomes: dict[int, _Outcome]) -> None:
        """Record the round as far as it went (every charge included), then end the run."""
        outcomes[p.client_id] = _Outcome(STATUS_FAILED, p.worker)
        for q in pending.values():
            outcomes[q.client_id] = _Outcome(STATUS_ABORTED, q.worker)
        pending.clear()
        for o in outcomes.values():
            if o.status != STATUS_FAILED:
                o.status = STATUS_ABORTED
        eps_units = self.ledger.epsilons() if self.pp.private else {}
        self.add_client_rows(r, outcomes, eps_units, max(eps_units.values(), default=None))
        self.write_results()
        policy = self.rt.on_client_failure
        why = (f"runtime.on_client_failure={policy!r}" if policy != "retry" else
               f"lost {p.attempt + 1} times (runtime.max_worker_restarts="
               f"{self.rt.max_worker_restarts})")
        raise RunFailedError(f"{what}; {why}: the run stops after {r - 1} round(s); "
                             "continue it with --resume")
