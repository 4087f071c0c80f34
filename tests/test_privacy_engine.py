"""Privacy at the engine level (tiny model, inline backend, no Ray).

* Every private mode (and FFA-LoRA for the example-level ones) runs end to end, and the
  epsilons in ``rounds.parquet``, ``clients.parquet`` and ``summary.json`` are exactly
  what ``ledger.json`` recomputes; the calibrated run spends between 90% and 100% of
  ``privacy.target_epsilon``.
* The noise that actually reaches the uploaded update (or the global state, for
  ``client``) has the configured standard deviation: training is made to produce zero
  gradients, so what moves the LoRA tensors is pure noise.
* The budget guard, accounting of empty Poisson batches and of rejected (non-finite)
  updates, an unreachable target and the DP-SGD preflight.

tiny-llama with LoRA r=4 on q_proj and v_proj has 896 trainable LoRA parameters (512 in
the A factors, 384 in the B factors), so the noise tests pool many jobs (seeds).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from dplora_ray.cli import main
from dplora_ray.config import ExperimentConfig, load_config
from dplora_ray.errors import PreflightError
from dplora_ray.federated.aggregator import Aggregator
from dplora_ray.federated.client import ClientJob, ClientResult, ClientWorker
from dplora_ray.federated.runner import RunPlan, plan_run, sample_cohorts
from dplora_ray.privacy import PrivacyLedger, effective_noise_scale
from dplora_ray.privacy.streams import NoiseKey

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
TARGET_EPSILON = 8.0  # configs/tiny.yaml
ROUNDS, LOCAL_STEPS, BATCH_SIZE = 3, 3, 8  # configs/tiny.yaml
TRAINABLE = 896
FILES = ("config.yaml", "rounds.parquet", "clients.parquet", "summary.json", "ledger.json")

#: name -> overrides of the end-to-end runs (all inline)
RUNS: dict[str, tuple[str, ...]] = {
    "dpsgd": ("privacy.mode=dpsgd",),
    "paper": ("privacy.mode=paper",),
    "client": ("privacy.mode=client",),
    "local": ("privacy.mode=local",),
    "dpsgd-ffa": ("privacy.mode=dpsgd", "lora.train_a=false"),
    "paper-ffa": ("privacy.mode=paper", "lora.train_a=false"),
}


def _train(out: Path, *overrides: str) -> int:
    argv = ["train", str(TINY), "--out", str(out), "--no-progress",
            "--set", "runtime.backend=inline"]
    for o in overrides:
        argv += ["--set", o]
    return main(argv)


def _cfg(*overrides: str) -> ExperimentConfig:
    return load_config(TINY, ["runtime.backend=inline", *overrides])


def _summary(out: Path) -> dict[str, Any]:
    return json.loads((out / "summary.json").read_text())


def _ledger_upto(ledger: PrivacyLedger, server_round: int) -> PrivacyLedger:
    """A fresh ledger holding only the entries of rounds <= ``server_round``."""
    part = PrivacyLedger(ledger.mode, ledger.accountant, ledger.delta,
                         ledger.unit_of_privacy)
    for e in ledger.entries:
        if e.server_round <= server_round:
            part.append(e)
    return part


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The output folder of one of :data:`RUNS`, trained on first use."""
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            out = tmp_path_factory.mktemp("engine") / name
            assert _train(out, *RUNS[name]) == 0
            done[name] = out
        return done[name]

    return get


@pytest.fixture(scope="module")
def plan() -> RunPlan:
    """The tiny config's data and partition (shared by the worker-level tests)."""
    return plan_run(_cfg())


# =========================================================================== 1. ledger
@pytest.mark.parametrize("name", list(RUNS))
def test_reported_epsilons_are_what_the_ledger_recomputes(run_dir: Callable[[str], Path],
                                                          name: str) -> None:
    # Prepare
    out = run_dir(name)
    mode = RUNS[name][0].split("=")[1]
    rounds = pd.read_parquet(out / "rounds.parquet")
    clients = pd.read_parquet(out / "clients.parquet")
    summary = _summary(out)

    # Execute
    ledger = PrivacyLedger.load(out / "ledger.json")
    final = ledger.epsilon()

    # Assert: the run's final epsilon
    assert ledger.mode == mode
    assert ledger.unit_of_privacy == ("example" if mode in ("dpsgd", "paper") else "client")
    assert summary["stop_reason"] == "completed"
    assert list(rounds["server_round"]) == list(range(1, ROUNDS + 1))
    assert final == pytest.approx(float(rounds["epsilon"].iloc[-1]), rel=1e-9)
    assert final == pytest.approx(summary["epsilon"], rel=1e-9)
    # calibration spends the budget without overshooting it
    assert 0.9 * TARGET_EPSILON <= final <= TARGET_EPSILON
    assert summary["planned_epsilon"] == pytest.approx(final, rel=1e-9)

    # Assert: every round's epsilon from the entries of rounds <= r
    for r, reported in zip(rounds["server_round"], rounds["epsilon"]):
        assert _ledger_upto(ledger, int(r)).epsilon() == pytest.approx(reported, rel=1e-9), r

    # Assert: every client-round's epsilon (per client for dpsgd/paper/local; the one
    # global epsilon of DP-FedAvg for client)
    for row in clients.itertuples():
        upto = _ledger_upto(ledger, row.server_round)
        expected = (upto.epsilon() if mode == "client"
                    else upto.epsilon(f"client-{row.client_id}"))
        assert row.epsilon == pytest.approx(expected, rel=1e-9), row


@pytest.mark.parametrize("name", list(RUNS))
def test_ledger_entries_follow_the_plan(run_dir: Callable[[str], Path], name: str) -> None:
    # Prepare
    out = run_dir(name)
    mode = RUNS[name][0].split("=")[1]
    train_a = "lora.train_a=false" not in RUNS[name]
    clients = pd.read_parquet(out / "clients.parquet")
    summary = _summary(out)

    # Execute
    entries = PrivacyLedger.load(out / "ledger.json").entries

    # Assert: the accounted multiplier is the mode's sigma times its sensitivity scale
    # (paper: 1 / (2 sqrt 2), FFA-LoRA 1/2)
    scale = effective_noise_scale(mode, train_a)
    assert summary["effective_noise_multiplier"] == pytest.approx(
        summary["noise_multiplier"] * scale, rel=1e-12)
    assert {e.noise_multiplier for e in entries} == {summary["effective_noise_multiplier"]}
    if mode == "client":  # one Poisson-sampled Gaussian per round over all clients
        assert [(e.unit, e.server_round, e.sampling_rate, e.steps) for e in entries] == [
            ("all-clients", r, 3 / 6, 1) for r in range(1, ROUNDS + 1)]
        return
    # one entry per sampled client and round
    got = sorted((e.server_round, e.unit, e.sampling_rate, e.steps) for e in entries)
    # (local: one unsampled Gaussian release per participation; dpsgd/paper: local_steps
    # Poisson-sampled steps at q = batch_size / n_client)
    want = sorted((int(row.server_round), f"client-{row.client_id}",
                   1.0 if mode == "local" else min(1.0, BATCH_SIZE / row.num_examples),
                   1 if mode == "local" else LOCAL_STEPS) for row in clients.itertuples())
    assert got == want


# =========================================================================== 2. noise
def _zero_gradients_inplace(monkeypatch: pytest.MonkeyPatch, worker: ClientWorker) -> None:
    """Make every training loss zero (0 * the real loss): the backward pass still runs
    (Opacus records all-zero per-sample gradients), but nothing but noise moves."""
    loss = worker._loss
    monkeypatch.setattr(worker, "_loss", lambda idx: 0.0 * loss(idx))


def _start(worker: ClientWorker) -> dict[str, torch.Tensor]:
    init = worker.initial_state()
    return {k: init[k] for k in worker.trainable_keys()}


def _updates(worker: ClientWorker, plan: RunPlan, sigma: float, jobs: int
             ) -> list[dict[str, torch.Tensor]]:
    start = _start(worker)
    out = []
    for j in range(jobs):
        cid = j % len(plan.parts)
        result = worker.train_client(start, ClientJob(client_id=cid, indices=plan.parts[cid],
                                                      seed=1000 + j, noise_multiplier=sigma,
                                                      noise_key=NoiseKey.from_seed(1000 + j)))
        assert result.status == "ok" and result.update is not None
        out.append(result.update)
    return out


def _pooled(updates: list[dict[str, torch.Tensor]], part: str = "") -> torch.Tensor:
    return torch.cat([t.double().flatten() for u in updates for k, t in sorted(u.items())
                      if part in k])


def _assert_std(draws: torch.Tensor, expected: float, rel: float = 0.03) -> None:
    """Sample std within ``rel`` of ``expected`` (the sample std's own relative sd is
    1/sqrt(2n), under 0.6% here), mean within 5 standard errors of 0, and no draw
    repeated (a generator re-seeded per tensor, step or job would repeat its noise)."""
    n = draws.numel()
    assert n >= 10_000, n
    assert torch.unique(draws).numel() > 0.999 * n
    std = float(draws.std())
    assert std == pytest.approx(expected, rel=rel), (std, expected)
    assert abs(float(draws.mean())) < 5 * expected / math.sqrt(n)


NOISE_JOBS = 24  # 24 x 896 = 21,504 noise draws per mode


def test_local_uploads_carry_noise_of_std_sigma_c(plan: RunPlan,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: zero gradients, so the clipped update is 0 and the upload is pure noise
    sigma, clip = 1.7, 0.5
    worker = ClientWorker(_cfg("privacy.mode=local", f"privacy.clipping_norm={clip}"),
                          plan.data)
    _zero_gradients_inplace(monkeypatch, worker)

    # Execute
    updates = _updates(worker, plan, sigma, NOISE_JOBS)

    # Assert: std = sigma * C = 0.85
    assert all(bool((t != 0).all()) for u in updates for t in u.values())
    _assert_std(_pooled(updates), sigma * clip)


def test_dpsgd_step_adds_noise_of_std_lr_sigma_c_over_batch(plan: RunPlan,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    # Prepare: one SGD step on zero per-sample gradients: the change is
    # -lr * N(0, sigma^2 C^2) / expected_batch_size
    sigma, clip, lr = 1.3, 0.7, 0.4
    worker = ClientWorker(_cfg("privacy.mode=dpsgd", f"privacy.clipping_norm={clip}",
                               "federation.optimizer=sgd", f"federation.learning_rate={lr}",
                               "federation.local_steps=1"), plan.data)
    _zero_gradients_inplace(monkeypatch, worker)

    # Execute
    updates = _updates(worker, plan, sigma, NOISE_JOBS)

    # Assert: std = 0.4 * 1.3 * 0.7 / 8 = 0.0455
    _assert_std(_pooled(updates), lr * sigma * clip / BATCH_SIZE)


def test_dpsgd_noise_accumulates_over_local_steps(plan: RunPlan,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: three independent noisy steps (tiny.yaml's local_steps) add up
    sigma, lr = 1.0, 0.8
    worker = ClientWorker(_cfg("privacy.mode=dpsgd", "federation.optimizer=sgd",
                               f"federation.learning_rate={lr}"), plan.data)
    _zero_gradients_inplace(monkeypatch, worker)

    # Execute
    updates = _updates(worker, plan, sigma, NOISE_JOBS)

    # Assert: std = lr * sigma * C * sqrt(3) / 8
    _assert_std(_pooled(updates), lr * sigma * 1.0 * math.sqrt(LOCAL_STEPS) / BATCH_SIZE)


@pytest.mark.parametrize("train_a", [True, False], ids=["lora", "ffa"])
def test_paper_step_adds_noise_of_std_sigma_c_to_each_group(plan: RunPlan,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            train_a: bool) -> None:
    # Prepare: one SGD step on a zero batch gradient: the change of A and of B is each
    # -lr * N(0, sigma^2 C^2) (DP-LoRA Alg. 1: noise on the clipped batch mean)
    sigma, clip, lr = 0.9, 0.6, 0.25
    worker = ClientWorker(_cfg("privacy.mode=paper", f"privacy.clipping_norm={clip}",
                               "federation.optimizer=sgd", f"federation.learning_rate={lr}",
                               "federation.local_steps=1", f"lora.train_a={train_a}"),
                          plan.data)
    _zero_gradients_inplace(monkeypatch, worker)

    # Execute
    updates = _updates(worker, plan, sigma, 2 * NOISE_JOBS)  # B: 384 per job

    # Assert: std = 0.25 * 0.9 * 0.6 = 0.135 in each group; A is not sent with FFA-LoRA
    expected = lr * sigma * clip
    _assert_std(_pooled(updates, ".lora_B."), expected)
    if train_a:
        _assert_std(_pooled(updates, ".lora_A."), expected)
    else:
        assert not any(".lora_A." in k for u in updates for k in u)


def test_client_mode_server_noise_has_std_sigma_c_over_expected_cohort(
        plan: RunPlan, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: clients send (clipped) zero updates; the aggregator adds N(0, sigma^2 C^2)
    # to their sum and divides by the expected cohort q * N = clients_per_round = 3
    sigma, clip, server_lr, cohort = 2.0, 0.8, 0.5, 3
    worker = ClientWorker(_cfg("privacy.mode=client", f"privacy.clipping_norm={clip}"),
                          plan.data)
    _zero_gradients_inplace(monkeypatch, worker)
    start = _start(worker)
    results = [worker.train_client(start, ClientJob(cid, plan.parts[cid], seed=7 + cid))
               for cid in range(cohort)]
    assert all(r.update is not None and all(bool((t == 0).all()) for t in r.update.values())
               for r in results)
    aggregator = Aggregator(initial=start, mode="client", server_learning_rate=server_lr,
                            clipping_norm=clip, noise_key=NoiseKey.from_seed(5))

    # Execute: one release per round (the generator is seeded by the round)
    moves = []
    for r in range(1, NOISE_JOBS + 1):
        before = {k: v.clone() for k, v in aggregator.get_state().items()}
        after = aggregator.aggregate(r, sigma, float(cohort), results)["state"]
        moves.append({k: after[k] - before[k] for k in before})

    # Assert: std = 0.5 * 2.0 * 0.8 / 3
    _assert_std(_pooled(moves), server_lr * sigma * clip / cohort)


# =========================================================================== 3. budget
@pytest.mark.parametrize("mode", ["dpsgd", "client"])
def test_budget_guard_stops_before_the_round_that_would_exceed_it(tmp_path: Path,
                                                                  mode: str) -> None:
    # Prepare: a fixed noise multiplier, no target; a first run shows each round's epsilon
    fixed = (f"privacy.mode={mode}", "privacy.target_epsilon=null",
             "privacy.noise_multiplier=1.0", "federation.rounds=5")
    assert _train(tmp_path / "free", *fixed) == 0
    eps = pd.read_parquet(tmp_path / "free" / "rounds.parquet")["epsilon"].tolist()
    k = next(i for i in range(1, len(eps)) if eps[i] > eps[i - 1])  # 0-based round index
    budget = (eps[k - 1] + eps[k]) / 2  # round k+1 (1-based) would exceed it
    out = tmp_path / "guarded"

    # Execute
    rc = _train(out, *fixed, f"privacy.max_epsilon={budget!r}")

    # Assert: stopped cleanly before that round; nothing of it was charged
    assert rc == 0
    summary = _summary(out)
    rounds = pd.read_parquet(out / "rounds.parquet")
    ledger = PrivacyLedger.load(out / "ledger.json")
    assert summary["stop_reason"] == "privacy_budget"
    assert summary["rounds_completed"] == k < summary["rounds_planned"] == 5
    assert len(rounds) == k
    assert rounds["epsilon"].iloc[-1] == pytest.approx(eps[k - 1], rel=1e-9)
    assert summary["epsilon"] <= budget
    assert ledger.epsilon() == pytest.approx(summary["epsilon"], rel=1e-9)
    assert max(e.server_round for e in ledger.entries) == k
    for name in FILES:
        assert (out / name).is_file(), name
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()


# =========================================================================== 4. empty
def test_empty_poisson_batches_are_still_accounted(tmp_path: Path,
                                                   run_dir: Callable[[str], Path],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: every Poisson batch of every client comes out empty
    def empty(self: ClientWorker, job: ClientJob, rng: np.random.Generator, rate: float
              ) -> Iterator[np.ndarray]:
        for _ in range(self.cfg.federation.local_steps):
            yield np.array([], dtype=np.int64)

    monkeypatch.setattr(ClientWorker, "_poisson_batches", empty)
    out = tmp_path / "empty"

    # Execute
    rc = _train(out, "privacy.mode=dpsgd")

    # Assert: noise-only steps, no loss measured, yet every sampled client was charged
    # local_steps steps at q = batch_size / n_client, exactly as in a normal run
    assert rc == 0
    clients = pd.read_parquet(out / "clients.parquet")
    assert (clients["status"] == "ok").all()
    assert clients["train_loss"].isna().all()
    assert (clients["steps"] == LOCAL_STEPS).all()
    ledger = PrivacyLedger.load(out / "ledger.json")
    assert len(ledger.entries) == len(clients) == ROUNDS * 3
    for row in clients.itertuples():
        [entry] = [e for e in ledger.entries if e.server_round == row.server_round
                   and e.unit == f"client-{row.client_id}"]
        assert entry.steps == LOCAL_STEPS
        assert entry.sampling_rate == pytest.approx(BATCH_SIZE / row.num_examples, rel=1e-12)
        assert row.sampling_rate == pytest.approx(entry.sampling_rate, rel=1e-12)
    normal = PrivacyLedger.load(run_dir("dpsgd") / "ledger.json")
    assert ledger.entries == normal.entries
    assert ledger.epsilon() == pytest.approx(normal.epsilon(), rel=1e-12)


# =========================================================================== 5. NaN
def test_non_finite_update_is_rejected_but_charged(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: one client of round 1 gets a NaN loss (its DP-SGD step poisons the LoRA
    # tensors, so its update is non-finite)
    bad = int(sample_cohorts(_cfg("privacy.mode=dpsgd"))[0][0])
    train_client = ClientWorker.train_client

    def poisoned(self: ClientWorker, global_state: Any, job: ClientJob) -> ClientResult:
        if job.client_id != bad:
            return train_client(self, global_state, job)
        loss = self._loss
        self._loss = lambda idx: loss(idx) * float("nan")  # type: ignore[method-assign]
        try:
            return train_client(self, global_state, job)
        finally:
            del self._loss

    monkeypatch.setattr(ClientWorker, "train_client", poisoned)
    out = tmp_path / "nan"

    # Execute
    rc = _train(out, "privacy.mode=dpsgd")

    # Assert
    assert rc == 0
    summary = _summary(out)
    assert summary["stop_reason"] == "completed" and summary["rounds_completed"] == ROUNDS
    assert math.isfinite(summary["epsilon"])
    clients = pd.read_parquet(out / "clients.parquet")
    rounds = pd.read_parquet(out / "rounds.parquet")
    rejected = clients[clients["status"] == "rejected_nonfinite"]
    assert len(rejected) >= 1
    assert set(rejected["client_id"]) == {bad}
    assert (rejected["bytes_up"] == 0).all()
    per_round = clients.groupby("server_round")["status"].apply(lambda s: (s == "ok").sum())
    assert rounds["num_clients_completed"].tolist() == per_round.tolist()
    assert rounds["num_clients_completed"].iloc[0] == rounds["num_clients_sampled"].iloc[0] - 1
    ledger = PrivacyLedger.load(out / "ledger.json")
    for row in rejected.itertuples():
        assert any(e.unit == f"client-{bad}" and e.server_round == row.server_round
                   and e.steps == LOCAL_STEPS for e in ledger.entries), row
    assert ledger.epsilon(f"client-{bad}") > 0
    assert ledger.epsilon(f"client-{bad}") == pytest.approx(
        float(rejected["epsilon"].iloc[-1]), rel=1e-9)


# =========================================================================== 6. target
def test_unreachable_target_epsilon_exits_2_without_output(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: 1e-6 at delta 1e-10 needs more than the largest noise multiplier (1e4)
    out = tmp_path / "unreachable"

    # Execute
    rc = _train(out, "privacy.mode=dpsgd", "privacy.target_epsilon=1e-6",
                "privacy.delta=1e-10", "federation.local_steps=50")

    # Assert
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1, err
    assert err[0].startswith("dplora-ray: error: target_epsilon=1e-06 is unreachable")
    assert not out.exists()


# =========================================================================== 7. preflight
def test_dpsgd_preflight_fails_when_a_lora_b_tensor_loses_its_per_sample_gradient(
        plan: RunPlan, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: after the GradSampleModule is built, one lora_B weight stops requiring
    # gradients but is still trained and sent (it stays in the worker's _params). A fresh
    # worker: the failed Opacus backward leaves its hooks unusable.
    worker = ClientWorker(_cfg("privacy.mode=dpsgd"), plan.data)
    assert worker.gsm is not None
    key = next(k for k in worker.trainable_keys() if ".lora_B." in k)
    monkeypatch.setattr(worker._params[key], "requires_grad", False)
    assert key in worker.trainable_keys()
    before = {k: p.detach().clone() for k, p in worker._params.items()}

    # Execute
    with pytest.raises(PreflightError) as info:
        worker.preflight()

    # Assert: refused; Opacus' hook on the frozen lora_B aborts the backward pass, so the
    # tensors it would have reached next (sorted first) are reported too
    message = str(info.value)
    assert message.startswith("privacy preflight (dpsgd) failed for ")
    assert ": no per-sample gradient" in message
    assert getattr(worker._params[key], "grad_sample", None) is None
    for k, p in worker._params.items():  # the preflight leaves the adapter as it was
        assert torch.equal(p.detach(), before[k]), k


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")
def test_failed_preflight_exits_2_and_leaves_no_output(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: LoRA on lm_head is outside the classifier path (the label logits read
    # lm_head's weight rows directly), so its tensors would never get a per-sample
    # gradient; the preflight must refuse before any round
    out = tmp_path / "preflight"

    # Execute
    rc = _train(out, "privacy.mode=dpsgd", "lora.target_modules=[q_proj, v_proj, lm_head]")

    # Assert: one line, exit 2, nothing half-written
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1] == ("dplora-ray: error: privacy preflight (dpsgd) failed for 2 LoRA "
                       "tensor(s); first: base_model.model.lm_head.lora_A.weight: no "
                       "per-sample gradient")
    assert not any(line.startswith(("Traceback", "round ")) for line in err)
    assert not out.exists()
