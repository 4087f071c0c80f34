"""The experiment runner (driver side).

Order of work, so that bad input never leaves a half-written folder:

1. validate: output folder, data (load, split, partition), model (prepare, tokenizer),
   privacy plan (cohort schedule, noise calibration, delta vs data size);
2. start the backend (workers load the base model once), preflight in private modes,
   evaluate the untrained adapter;
3. per round: budget guard -> dispatch the cohort (client jobs split over workers, one
   call per worker) -> aggregate (on the aggregator) -> charge the ledger -> evaluate ->
   write ``rounds.parquet`` / ``clients.parquet`` / ``ledger.json`` atomically;
4. write the adapter, ``summary.json``.

The cohorts of all rounds are drawn up front from the run seed (``fixed``: K of N
without replacement; ``poisson``: each client independently with q = K/N), so the noise
can be calibrated for exactly the planned participations, and the schedule does not depend
on timing or worker count. Each client's RNG seed is a function of (run seed, round,
client id) only.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dplora_ray import results as R
from dplora_ray.config import ExperimentConfig, save_config
from dplora_ray.errors import ConfigError, DataError, OutputError, PreflightError
from dplora_ray.federated.client import ClientJob, tensor_bytes
from dplora_ray.federated.encoding import EncodedData, encode_split, label_token_ids

__all__ = ["PrivacyPlan", "RunPlan", "plan_run", "run_experiment"]

UNIT_ALL_CLIENTS = "all-clients"


def client_unit(client_id: int) -> str:
    return f"client-{client_id}"


def derive_seed(seed: int, *key: int) -> int:
    """A 63-bit seed that depends only on (run seed, key)."""
    ss = np.random.SeedSequence(seed, spawn_key=tuple(int(k) for k in key))
    return int(ss.generate_state(1, np.uint64)[0] >> 1)


def cohort_mode(cfg: ExperimentConfig) -> str:
    mode = cfg.federation.cohort_sampling
    if mode == "auto":
        return "poisson" if cfg.privacy.mode == "client" else "fixed"
    return mode


def sample_cohorts(cfg: ExperimentConfig) -> list[np.ndarray]:
    """Sorted client ids sampled for each round 1..rounds (deterministic from the seed)."""
    fed = cfg.federation
    out = []
    for r in range(1, fed.rounds + 1):
        rng = np.random.default_rng(derive_seed(cfg.seed, 1, r))
        if cohort_mode(cfg) == "poisson":
            q = fed.clients_per_round / fed.num_clients
            ids = np.flatnonzero(rng.random(fed.num_clients) < q)
        else:
            ids = np.sort(rng.choice(fed.num_clients, size=fed.clients_per_round, replace=False))
        out.append(ids.astype(np.int64))
    return out


@dataclass(frozen=True)
class PrivacyPlan:
    """Noise and accounting parameters fixed before training."""

    mode: str
    unit: str  # "example" | "client" | "none"
    noise_multiplier: float  # what the mechanism uses (the paper's sigma in `paper`)
    effective_noise_multiplier: float  # what the accountant sees
    budget: float | None
    planned_epsilon: float | None


@dataclass
class RunPlan:
    cfg: ExperimentConfig
    data: EncodedData
    parts: list[np.ndarray]
    cohorts: list[np.ndarray]
    privacy: PrivacyPlan
    model_source: str
    label_names: tuple[str, ...]

    def client_rate(self, cid: int) -> float:
        return min(1.0, self.cfg.federation.batch_size / len(self.parts[cid]))

    def ledger_entries(self, server_round: int, cohort: np.ndarray) -> list[Any]:
        """What one round charges (every sampled client, whether or not it completes)."""
        from dplora_ray.privacy import LedgerEntry

        p, fed = self.privacy, self.cfg.federation
        z = p.effective_noise_multiplier
        if p.mode in ("dpsgd", "paper"):
            return [LedgerEntry(client_unit(int(c)), server_round, z, self.client_rate(int(c)),
                                fed.local_steps) for c in cohort]
        if p.mode == "local":
            return [LedgerEntry(client_unit(int(c)), server_round, z, 1.0, 1) for c in cohort]
        if p.mode == "client":
            return [LedgerEntry(UNIT_ALL_CLIENTS, server_round, z,
                                fed.clients_per_round / fed.num_clients, 1)]
        return []


def _check_output(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError("--out", str(out_dir), "exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise OutputError("--out", str(out_dir),
                          "exists and is not empty; pass --overwrite or pick a new folder")


def _encode(cfg: ExperimentConfig) -> tuple[EncodedData, Any, str]:
    from transformers import AutoTokenizer

    from dplora_ray.data import load_data
    from dplora_ray.errors import ModelError
    from dplora_ray.models import prepare_model

    loaded = load_data(cfg.data, cfg.seed)
    source = prepare_model(cfg.model)
    try:
        tok = AutoTokenizer.from_pretrained(source, revision=cfg.model.revision)
    except OSError as exc:
        raise ModelError("model.name", cfg.model.name,
                         f"tokenizer could not be loaded ({str(exc).splitlines()[0]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    task = loaded.task
    label_ids = label_token_ids(tok, task.label_words)
    ml = cfg.model.max_length
    train = encode_split(tok, task.prompt_template, loaded.train["text"].tolist(),
                         loaded.train["label"].to_numpy(), ml)
    test = encode_split(tok, task.prompt_template, loaded.test["text"].tolist(),
                        loaded.test["label"].to_numpy(), ml)
    data = EncodedData(train=train, test=test, label_token_ids=label_ids,
                       pad_id=int(tok.pad_token_id), num_labels=len(task.label_names))
    return data, loaded, source


def _privacy_plan(cfg: ExperimentConfig, parts: list[np.ndarray],
                  cohorts: list[np.ndarray]) -> PrivacyPlan:
    pc, fed = cfg.privacy, cfg.federation
    if not pc.enabled:
        return PrivacyPlan("none", "none", 0.0, 0.0, None, None)
    from dplora_ray.privacy import (
        SampledGaussian,
        calibrate_noise_multiplier,
        compute_epsilon,
        effective_noise_scale,
    )

    unit = "example" if pc.mode in ("dpsgd", "paper") else "client"
    if unit == "example":
        n_max = max(len(p) for p in parts)
        if pc.delta >= 1.0 / n_max:
            raise ConfigError("privacy.delta", pc.delta,
                              f"must be below 1/n = {1.0 / n_max:.3g} (n = {n_max} examples "
                              "in the largest client)")
    elif pc.delta >= 1.0 / fed.num_clients:
        raise ConfigError("privacy.delta", pc.delta,
                          f"must be below 1/federation.num_clients = {1.0 / fed.num_clients:.3g}")
    if pc.mode == "client" and fed.cohort_sampling == "fixed":
        raise ConfigError("federation.cohort_sampling", "fixed",
                          "privacy.mode='client' is accounted as Poisson client sampling; "
                          "use 'poisson' or 'auto'")
    scale = effective_noise_scale(pc.mode, cfg.lora.train_a)
    # planned (sampling rate, steps) per accounting unit; only the Pareto front matters
    plans: dict[tuple[float, int], None] = {}
    if pc.mode == "client":
        plans[(fed.clients_per_round / fed.num_clients, fed.rounds)] = None
    else:
        counts = np.zeros(fed.num_clients, dtype=np.int64)
        for c in cohorts:
            counts[c] += 1
        for cid in np.flatnonzero(counts):
            if pc.mode == "local":
                plans[(1.0, int(counts[cid]))] = None
            else:
                q = min(1.0, fed.batch_size / len(parts[cid]))
                plans[(q, int(counts[cid]) * fed.local_steps)] = None
    front = [(q, t) for (q, t) in plans
             if not any(q2 >= q and t2 >= t and (q2, t2) != (q, t) for (q2, t2) in plans)]
    if pc.noise_multiplier is not None:
        sigma = pc.noise_multiplier
    else:
        assert pc.target_epsilon is not None
        sigma = max(calibrate_noise_multiplier(pc.target_epsilon, q, t, pc.delta,
                                               pc.accountant, effective_scale=scale)
                    for (q, t) in front) if front else 0.0
    planned = max((compute_epsilon([SampledGaussian(sigma * scale, q, t)], pc.delta,
                                   pc.accountant) for (q, t) in front), default=0.0)
    return PrivacyPlan(pc.mode, unit, sigma, sigma * scale, pc.budget, planned)


def plan_run(cfg: ExperimentConfig) -> RunPlan:
    """Everything that can fail on bad input, done before any output is written."""
    from dplora_ray.data import partition_indices

    data, loaded, source = _encode(cfg)
    fed = cfg.federation
    groups = loaded.train["group"].to_numpy() if "group" in loaded.train else None
    if fed.num_clients > len(data.train):
        raise DataError("federation.num_clients", fed.num_clients,
                        f"more clients than training examples ({len(data.train)})")
    parts = partition_indices(data.train.labels, groups, fed.num_clients, fed.partition,
                              alpha=fed.dirichlet_alpha, seed=cfg.seed)
    cohorts = sample_cohorts(cfg)
    privacy = _privacy_plan(cfg, parts, cohorts)
    return RunPlan(cfg, data, parts, cohorts, privacy, source, loaded.task.label_names)


def f1_macro(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int) -> float:
    """Unweighted mean of per-label F1 over the labels present in truth or prediction."""
    scores = []
    for k in range(num_labels):
        tp = int(np.sum((y_pred == k) & (y_true == k)))
        fp = int(np.sum((y_pred == k) & (y_true != k)))
        fn = int(np.sum((y_pred != k) & (y_true == k)))
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="rounds", unit="round", file=sys.stderr,
                            dynamic_ncols=True)

    def update(self, **post: Any) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: v for k, v in post.items() if v is not None}, refresh=False)
            self.bar.update(1)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _NoLedger:
    """Stands in for the privacy ledger when ``privacy.mode`` is ``none``."""

    def append(self, entry: Any) -> None:
        raise AssertionError("nothing is charged without privacy")

    def epsilons(self) -> dict[str, float]:
        return {}

    def save(self, path: Path) -> None:
        R.write_json_atomic({"mode": "none", "unit_of_privacy": None, "entries": [],
                             "protects": "nothing: privacy.mode is 'none'"}, path)


def _fmt(x: float | None, spec: str = ".3f") -> str | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def run_experiment(cfg: ExperimentConfig, out_dir: str | Path, *, overwrite: bool = False,
                   progress: bool = True, log: Callable[[str], None] | None = None
                   ) -> dict[str, Any]:
    """Run one federated experiment and write its results into ``out_dir``.

    Returns the summary dict (also written as ``summary.json``).
    """
    from dplora_ray.models import save_adapter
    from dplora_ray.privacy import PrivacyLedger

    t_start = time.perf_counter()
    out = Path(out_dir)
    _check_output(out, overwrite)
    say = log or (lambda m: print(m, file=sys.stderr))
    plan = plan_run(cfg)
    fed, pc = cfg.federation, cfg.privacy
    pp = plan.privacy

    # ---- all validation passed: from here on we write into `out`
    existed = out.is_dir()
    if out.exists() and overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    unit_text = {"example": "one training example of a client",
                 "client": "all the data of one client", "none": "nothing"}[pp.unit]
    ledger = (PrivacyLedger(mode=pc.mode, accountant=pc.accountant, delta=pc.delta,
                            unit_of_privacy=pp.unit) if pp.mode != "none" else _NoLedger())
    if pp.mode != "none":
        say(f"privacy: mode={pp.mode}, protects {unit_text}; noise multiplier "
            f"{pp.noise_multiplier:.4g} (accounted as {pp.effective_noise_multiplier:.4g}), "
            f"C={pc.clipping_norm}, delta={pc.delta:g}, planned epsilon "
            f"{pp.planned_epsilon:.3f} ({pc.accountant})")

    say(f"starting {cfg.runtime.backend} backend "
        f"({cfg.runtime.num_workers if cfg.runtime.backend == 'actors' else 1} worker(s), "
        f"model {cfg.model.name})")
    from dplora_ray.federated.backends import make_backend

    backend = make_backend(cfg, plan.data)
    try:
        return _run_rounds(cfg, plan, backend, ledger, out, t_start, say, progress,
                           save_adapter)
    except PreflightError:
        # found before any round ran: leave nothing half-written (only config.yaml is)
        shutil.rmtree(out, ignore_errors=True)
        if existed:
            out.mkdir(parents=True, exist_ok=True)
        raise
    finally:
        backend.shutdown()


def _run_rounds(cfg, plan: RunPlan, backend, ledger, out: Path, t_start: float, say,
                progress: bool, save_adapter) -> dict[str, Any]:
    fed, pc, pp = cfg.federation, cfg.privacy, plan.privacy
    workers = backend.workers
    w0 = workers[0]
    init_full = backend.get(backend.submit(w0, "initial_state"))
    trainable_keys = backend.get(backend.submit(w0, "trainable_keys"))
    initial = {k: init_full[k] for k in trainable_keys}
    if pp.mode != "none" and pc.preflight:
        info = backend.get(backend.submit(w0, "preflight"))
        say(f"privacy preflight passed ({info['checked_tensors']} LoRA tensors got "
            "per-sample gradients and changed)")
    aggregator = backend.make_aggregator(initial=initial, mode=pp.mode,
                                         server_learning_rate=fed.server_learning_rate,
                                         clipping_norm=pc.clipping_norm, seed=cfg.seed)
    from dplora_ray.federated.client import TRANSFER_DTYPES

    tdtype = TRANSFER_DTYPES[fed.transfer_dtype]
    down_bytes = tensor_bytes({k: v.to(tdtype) for k, v in initial.items()})
    test_index = np.arange(len(plan.data.test))
    eval_shards = [s for s in np.array_split(test_index, len(workers)) if len(s)]

    def evaluate(state_ref) -> tuple[float, float, float]:
        futs = [backend.submit(workers[i], "evaluate", state_ref, shard)
                for i, shard in enumerate(eval_shards)]
        parts = backend.get(futs)
        losses = np.concatenate([p[0] for p in parts])
        preds = np.concatenate([p[1] for p in parts])
        y = plan.data.test.labels
        return (float(losses.mean()), float((preds == y).mean()),
                f1_macro(y, preds, plan.data.num_labels))

    before_loss, before_acc, before_f1 = evaluate(backend.put(initial))
    say(f"eval before training: accuracy {before_acc:.4f}, macro-F1 {before_f1:.4f}, "
        f"loss {before_loss:.4f} ({len(test_index)} held-out examples)")

    rounds_rows: list[dict[str, Any]] = []
    client_rows: list[dict[str, Any]] = []
    stop_reason = "completed"
    last_eval = (before_loss, before_acc, before_f1)
    bar = _Progress(fed.rounds, progress)
    expected_cohort = float(fed.clients_per_round)
    try:
        for r, cohort in enumerate(plan.cohorts, start=1):
            t0 = time.perf_counter()
            entries = plan.ledger_entries(r, cohort)
            budget = pp.budget
            if budget is not None and entries and ledger.epsilon_if(entries) > budget * (1 + 1e-9):
                stop_reason = "privacy_budget"
                bar.write(f"round {r}: stopping before it would push epsilon past "
                          f"privacy.max_epsilon={budget}")
                break
            state_ref = backend.submit(aggregator, "get_state")
            jobs: list[list[ClientJob]] = [[] for _ in workers]
            for pos, cid in enumerate(cohort):
                cid = int(cid)
                jobs[pos % len(workers)].append(ClientJob(
                    client_id=cid, indices=plan.parts[cid], seed=derive_seed(cfg.seed, 2, r, cid),
                    noise_multiplier=pp.noise_multiplier))
            futs = [backend.submit(w, "train_clients", state_ref, js)
                    for w, js in zip(workers, jobs) if js]
            agg_fut = backend.submit(aggregator, "aggregate", r, pp.noise_multiplier,
                                     expected_cohort, *futs)
            for e in entries:  # charged whether or not the client completes
                ledger.append(e)
            agg = backend.get(agg_fut)
            results = agg["results"]
            do_eval = (r % fed.eval_every == 0) or r == fed.rounds
            if do_eval:
                last_eval = evaluate(backend.submit(aggregator, "get_state"))
            eval_loss, eval_acc, eval_f1 = last_eval if do_eval else (math.nan,) * 3
            eps_units = ledger.epsilons() if pp.mode != "none" else {}
            epsilon = max(eps_units.values()) if eps_units else None
            eps_mean = float(np.mean(list(eps_units.values()))) if eps_units else None
            completed = [x for x in results if x.status == "ok"]
            bytes_up = sum(x.bytes_up for x in results)
            for x in results:
                client_rows.append({
                    R.SERVER_ROUND: r, R.CLIENT_ID: x.client_id, R.WORKER: x.worker,
                    R.STATUS: x.status, R.NUM_EXAMPLES: x.num_examples,
                    R.TRAIN_LOSS: x.train_loss, R.UPDATE_NORM: x.update_norm,
                    R.BYTES_UP: x.bytes_up, R.BYTES_DOWN: down_bytes, R.SECONDS: x.seconds,
                    R.STEPS: x.steps, R.SAMPLING_RATE: x.sampling_rate,
                    R.EPSILON: (eps_units.get(client_unit(x.client_id))
                                if pp.unit == "example" or pp.mode == "local" else epsilon),
                })
                if x.status != "ok":
                    bar.write(f"round {r}: client {x.client_id} {x.status}")
            losses = [x.train_loss for x in completed if math.isfinite(x.train_loss)]
            row = {
                R.SERVER_ROUND: r,
                R.TRAIN_LOSS: float(np.mean(losses)) if losses else math.nan,
                R.EVAL_LOSS: eval_loss, R.EVAL_ACCURACY: eval_acc, R.EVAL_F1_MACRO: eval_f1,
                R.NUM_CLIENTS_SAMPLED: len(cohort), R.NUM_CLIENTS_COMPLETED: len(completed),
                R.BYTES_UP: bytes_up, R.BYTES_DOWN: down_bytes * len(cohort),
                R.ROUND_SECONDS: time.perf_counter() - t0, R.EPSILON: epsilon,
                R.EPSILON_MEAN: eps_mean,
                R.NOISE_MULTIPLIER: pp.noise_multiplier if pp.mode != "none" else None,
            }
            rounds_rows.append(row)
            R.write_rounds(rounds_rows, out / "rounds.parquet")
            R.write_clients(client_rows, out / "clients.parquet")
            ledger.save(out / "ledger.json")
            bar.update(loss=_fmt(row[R.TRAIN_LOSS]), acc=_fmt(last_eval[1]),
                       eps=_fmt(epsilon, ".2f"))
    finally:
        bar.close()

    final_state = backend.get(backend.submit(aggregator, "get_state"))
    full = dict(init_full)
    full.update({k: v for k, v in final_state.items()})
    save_adapter(out / "adapter", cfg.lora, plan.model_source, full)
    R.write_rounds(rounds_rows, out / "rounds.parquet")
    R.write_clients(client_rows, out / "clients.parquet")
    ledger.save(out / "ledger.json")
    epsilon = ledger.epsilon() if pp.mode != "none" else None
    summary = {
        "eval_accuracy_before": before_acc,
        "eval_f1_macro_before": before_f1,
        "eval_loss_before": before_loss,
        "eval_accuracy": last_eval[1] if rounds_rows else None,
        "eval_f1_macro": last_eval[2] if rounds_rows else None,
        "eval_loss": last_eval[0] if rounds_rows else None,
        "epsilon": epsilon,
        "delta": pc.delta if pp.mode != "none" else None,
        "noise_multiplier": pp.noise_multiplier if pp.mode != "none" else None,
        "effective_noise_multiplier": (pp.effective_noise_multiplier
                                       if pp.mode != "none" else None),
        "planned_epsilon": pp.planned_epsilon,
        "privacy_mode": pp.mode,
        "privacy_unit": pp.unit,
        "accountant": pc.accountant if pp.mode != "none" else None,
        "rounds_completed": len(rounds_rows),
        "rounds_planned": fed.rounds,
        "stop_reason": stop_reason,
        "bytes_up_total": int(sum(r_[R.BYTES_UP] for r_ in rounds_rows)),
        "bytes_down_total": int(sum(r_[R.BYTES_DOWN] for r_ in rounds_rows)),
        "wall_seconds": time.perf_counter() - t_start,
        "trainable_parameters": int(sum(v.numel() for v in initial.values())),
        "model": cfg.model.name,
        "num_train_examples": len(plan.data.train),
        "num_test_examples": len(plan.data.test),
        "output_dir": str(out),
    }
    R.write_json_atomic(summary, out / "summary.json")
    return summary
