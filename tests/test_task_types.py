"""Multiple-choice (PIQA) and generation (MedQuAD) task types: loading into the engine's
pools, encoding (target masks, truncation, left-padded prompts), the losses against a
reference computed from the model's own logits, DP-SGD per-example gradients when one
example is several sequences, evaluation metrics, and short end-to-end runs on the tiny
model in every privacy mode.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from dplora_ray.config import ExperimentConfig, load_config
from dplora_ray.errors import ConfigError
from dplora_ray.federated.client import ClientJob, ClientWorker
from dplora_ray.federated.encoding import encode_choices, encode_generation
from dplora_ray.federated.runner import RunPlan, plan_run, run_experiment
from dplora_ray.privacy.streams import NoiseKey

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
DATA = REPO.parent / "shared" / "data"
pytestmark = pytest.mark.usefixtures("shared_data")  # fails (never skips) without it

PIQA = ["data.recipe=piqa", "data.task=multiple_choice", f"data.path={DATA / 'piqa'}",
        "data.max_train_examples=120", "data.test_size=40"]
MEDQUAD = ["data.recipe=medquad", "data.task=qa_generation", f"data.path={DATA / 'medquad'}",
           "data.max_train_examples=120", "data.test_size=24", "data.max_new_tokens=12"]


def _cfg(task: list[str], *overrides: str) -> ExperimentConfig:
    return load_config(TINY, ["runtime.backend=inline", *task, *overrides])


@pytest.fixture(scope="module")
def piqa_plan() -> RunPlan:
    return plan_run(_cfg(PIQA))


@pytest.fixture(scope="module")
def medquad_plan() -> RunPlan:
    return plan_run(_cfg(MEDQUAD))


@pytest.fixture(scope="module")
def worker_for() -> Callable[..., ClientWorker]:
    cache: dict[tuple[str, ...], ClientWorker] = {}

    def make(plan: RunPlan, task: list[str], *overrides: str) -> ClientWorker:
        key = (*task, *overrides)
        if key not in cache:
            cache[key] = ClientWorker(_cfg(task, *overrides), plan.data)
        return cache[key]

    return make


def _start(worker: ClientWorker) -> dict[str, torch.Tensor]:
    init = worker.initial_state()
    return {k: init[k] for k in worker.trainable_keys()}


# ------------------------------------------------------------------------ loading


def test_piqa_pool_splits_the_validation_set_and_keeps_both_solutions() -> None:
    from dplora_ray.data import load_data

    cfg = _cfg(PIQA[:3], "data.test_size=200", "data.max_train_examples=null").data
    loaded = load_data(cfg, seed=0)
    # the local copy has no train split: its 1838 labelled items are split
    assert len(loaded.train) + len(loaded.test) == 1838
    assert len(loaded.test) == 200 and loaded.test["label"].value_counts().to_dict() == {
        0: 100, 1: 100}  # balanced over the right-choice position
    row = loaded.train.iloc[0]
    assert isinstance(row["choices"], tuple) and len(row["choices"]) == 2
    assert all(isinstance(c, str) and c for c in row["choices"])
    # same goal text never appears with the same solutions on both sides
    key = lambda f: set(zip(f["text"], f["choices"]))  # noqa: E731
    assert key(loaded.train).isdisjoint(key(loaded.test))


def test_medquad_pool_uses_the_document_split_and_carries_answers() -> None:
    from dplora_ray.data import load_data, load_examples

    cfg = _cfg(MEDQUAD[:3], "data.test_size=100", "data.max_train_examples=null").data
    loaded = load_data(cfg, seed=0)
    raw = load_examples(cfg)
    test_questions = set(raw.loc[raw["split"] == "test", "question"])
    assert set(loaded.test["text"]) <= test_questions
    assert len(loaded.train) == int((raw["split"] == "train").sum())
    assert (loaded.train["label"] == 0).all() and (loaded.train["target"].str.len() > 0).all()
    assert loaded.train["group"].nunique() == 9  # NIH source sites: a natural partition


# ----------------------------------------------------------------------- encoding


class _Tok:
    """A character-level tokenizer (one token per character, ids = code points)."""

    bos_token_id = None
    eos_token_id = 3

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict:
        return {"input_ids": [self.encode(t) for t in texts]}


def test_encode_choices_rows_target_mask_and_truncation() -> None:
    tok = _Tok()
    split = encode_choices(tok, "Q:{text}|", ["ab", "x" * 50], [("cd", "e"), ("f" * 10, "gg")],
                           [1, 0], 2, max_length=12)
    assert len(split) == 2 and split.choices == 2
    # the second example's first choice is cut to the 6 tokens left after its prompt
    assert split.sequence_lengths().tolist() == [8, 7, 12, 9]
    # prompt keeps at most half of max_length (6): "Q:" + text cut + "|"
    assert split.prompt_lens.tolist() == [5, 5, 6, 6]
    batch = split.batch(np.array([1, 0]), pad_id=0)
    assert batch["input_ids"].shape == (4, 12)  # 2 examples x 2 choices
    assert batch["labels"].tolist() == [0, 1]
    first = batch["input_ids"][2, :8].tolist()  # example 0, choice 0
    assert "".join(map(chr, first)) == "Q:ab| cd"
    assert batch["target_mask"][2].tolist() == [0] * 5 + [1] * 3 + [0] * 4
    assert split.lengths().tolist() == [8, 12]


def test_encode_generation_appends_eos_and_left_pads_prompts() -> None:
    tok = _Tok()
    split = encode_generation(tok, "Q:{text}A:", ["hi", "longer question"],
                              ["yes", "a very long answer"], max_length=14)
    # example 0: "Q:hiA:" (6) + " yes" (4) + eos
    assert split.target_ids(0).tolist() == [ord(c) for c in " yes"] + [3]
    # example 1: prompt cut to 7 ("Q:" + 3 chars + "A:"), answer cut to 7, no room for eos
    assert split.prompt_lens.tolist() == [6, 7] and len(split.target_ids(1)) == 7
    assert 3 not in split.target_ids(1).tolist()
    prompts = split.prompt_batch(np.array([0, 1]), pad_id=0)
    assert prompts["input_ids"][0].tolist()[:1] == [0]  # left padding
    assert prompts["attention_mask"].tolist() == [[0] + [1] * 6, [1] * 7]


# --------------------------------------------------------------- losses and scores


def _reference_logprobs(worker: ClientWorker, batch: dict) -> torch.Tensor:
    """Summed log-probability of each row's target tokens from the model's full logits."""
    out = worker.model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits.float()
    lp = torch.log_softmax(out[:, :-1], dim=-1).gather(
        2, batch["input_ids"][:, 1:].unsqueeze(2)).squeeze(2)
    return (lp * batch["target_mask"][:, 1:]).sum(dim=1)


def test_multiple_choice_loss_is_cross_entropy_over_choice_likelihoods(
    piqa_plan: RunPlan, worker_for: Callable[..., ClientWorker]
) -> None:
    worker = worker_for(piqa_plan, PIQA)
    worker._load_global(_start(worker))
    idx = piqa_plan.parts[0][:5]
    batch = piqa_plan.data.train.batch(idx, piqa_plan.data.pad_id)
    with torch.no_grad():
        ours = worker._batch_loss(batch, train=False)
        scores = _reference_logprobs(worker, batch).view(-1, 2)
    expected = F.cross_entropy(scores, batch["labels"], reduction="none")
    assert ours.shape == (5,)
    assert torch.allclose(ours, expected, atol=1e-4), (ours, expected)
    # evaluation predicts the likelier choice
    losses, preds = worker.evaluate(_start(worker), np.arange(len(piqa_plan.data.test)))
    test_batch = piqa_plan.data.test.batch(np.arange(len(piqa_plan.data.test)), 0)
    with torch.no_grad():
        s = _reference_logprobs(worker, test_batch).view(-1, 2)
    assert (preds == s.argmax(dim=1).numpy()).mean() >= 0.95  # ties/padding numerics aside


def test_generation_loss_is_mean_nll_of_answer_tokens(
    medquad_plan: RunPlan, worker_for: Callable[..., ClientWorker]
) -> None:
    worker = worker_for(medquad_plan, MEDQUAD)
    worker._load_global(_start(worker))
    idx = medquad_plan.parts[0][:4]
    batch = medquad_plan.data.train.batch(idx, medquad_plan.data.pad_id)
    with torch.no_grad():
        ours = worker._batch_loss(batch, train=False)
        ref = -_reference_logprobs(worker, batch) / batch["target_mask"][:, 1:].sum(dim=1)
    assert torch.allclose(ours, ref, atol=1e-4)
    # the prompt's tokens are not scored: changing them changes the loss only through
    # the context, and an all-prompt row would have no target
    assert (batch["target_mask"].sum(dim=1) > 0).all()


def test_generation_evaluation_perplexity_and_greedy_answers(
    medquad_plan: RunPlan, worker_for: Callable[..., ClientWorker]
) -> None:
    worker = worker_for(medquad_plan, MEDQUAD)
    n = len(medquad_plan.data.test)
    out = worker.evaluate_detail(_start(worker), np.arange(n))
    assert out["tokens"].tolist() == [len(medquad_plan.data.test.target_ids(i))
                                      for i in range(n)]
    assert np.allclose(out["loss"], out["nll"] / out["tokens"])
    assert len(out["generated"]) == n
    assert all(len(g) <= 12 for g in out["generated"])
    assert all(medquad_plan.data.eos_id not in g.tolist() for g in out["generated"])
    # deterministic: greedy decoding
    again = worker.evaluate_detail(_start(worker), np.arange(n))
    assert all(np.array_equal(a, b) for a, b in zip(out["generated"], again["generated"]))


@pytest.mark.parametrize(("task", "plan_name"), [(PIQA, "piqa_plan"), (MEDQUAD, "medquad_plan")])
def test_dpsgd_per_example_gradients_match_a_per_example_loop(
    task: list[str], plan_name: str, request: pytest.FixtureRequest,
    worker_for: Callable[..., ClientWorker]
) -> None:
    # Prepare: a multiple-choice example is two sequences; Opacus sees rows, the fold
    # must give one gradient per example
    plan = request.getfixturevalue(plan_name)
    worker = worker_for(plan, task, "privacy.mode=dpsgd")
    worker._load_global(_start(worker))
    gsm, params = worker.gsm, worker._params
    assert gsm is not None
    idx = plan.parts[0][:3]
    worker.model.train()
    try:
        gsm.zero_grad(set_to_none=True)
        (worker._loss(idx) / worker.choices).backward()
        worker._fold_grad_samples()
        per_example = {k: p.grad_sample.detach().clone() for k, p in params.items()}
        looped: dict[str, list[torch.Tensor]] = {k: [] for k in params}
        for i in idx:
            gsm.zero_grad(set_to_none=True)
            worker._loss(np.array([i])).backward()
            for k, p in params.items():
                looped[k].append(p.grad.detach().clone())
    finally:
        gsm.zero_grad(set_to_none=True)
        worker.model.eval()
    for k in params:
        assert per_example[k].shape == (3, *params[k].shape)
        assert torch.allclose(per_example[k], torch.stack(looped[k]), atol=2e-6, rtol=1e-4), k


# ------------------------------------------------------------------- end to end


@pytest.mark.parametrize("mode", ["none", "dpsgd", "paper", "client", "local"])
@pytest.mark.parametrize("which", ["piqa", "medquad"])
def test_runs_end_to_end_in_every_mode(tmp_path: Path, which: str, mode: str) -> None:
    task = PIQA if which == "piqa" else MEDQUAD
    extra = ["federation.cohort_sampling=poisson"] if mode == "client" else []
    cfg = _cfg(task, f"privacy.mode={mode}", "federation.rounds=2", "federation.local_steps=2",
               *extra)
    summary = run_experiment(cfg, tmp_path / "run", progress=False)
    rounds = pd.read_parquet(tmp_path / "run" / "rounds.parquet")
    assert summary["rounds_completed"] == 2 and summary["stop_reason"] == "completed"
    if which == "piqa":
        assert summary["task_type"] == "multiple_choice"
        assert 0.0 <= summary["eval_accuracy"] <= 1.0
        assert rounds["eval_rouge_l"].isna().all()
    else:
        assert summary["task_type"] == "generation"
        assert summary["eval_accuracy"] is None
        assert summary["eval_perplexity"] > 1.0 and 0.0 <= summary["eval_rouge_l"] <= 1.0
        assert rounds["eval_perplexity"].iloc[-1] == pytest.approx(summary["eval_perplexity"])
        assert math.log(summary["eval_perplexity"]) == pytest.approx(summary["eval_loss"])
    if mode == "none":
        assert summary["epsilon"] is None
    else:
        ledger = json.loads((tmp_path / "run" / "ledger.json").read_text())
        assert ledger["entries"] and summary["epsilon"] > 0
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_training_lowers_the_answer_perplexity(tmp_path: Path) -> None:
    cfg = _cfg(MEDQUAD, "federation.rounds=4", "federation.local_steps=5",
               "federation.learning_rate=0.05")
    summary = run_experiment(cfg, tmp_path / "run", progress=False)
    assert summary["eval_perplexity"] < 0.9 * summary["eval_perplexity_before"]


def test_audit_refuses_sequence_tasks() -> None:
    with pytest.raises(ConfigError) as info:
        plan_run(_cfg(MEDQUAD, "audit.enabled=true"))
    assert info.value.key == "audit.enabled" and "generation task" in str(info.value)


def test_dpsgd_step_on_a_multiple_choice_client(
    piqa_plan: RunPlan, worker_for: Callable[..., ClientWorker]
) -> None:
    worker = worker_for(piqa_plan, PIQA, "privacy.mode=dpsgd")
    job = ClientJob(client_id=0, indices=piqa_plan.parts[0], seed=5, noise_multiplier=1.0,
                    noise_key=NoiseKey.from_seed(5))
    res = worker.train_client(_start(worker), job)
    assert res.status == "ok" and res.update is not None and res.steps == 3
    again = worker.train_client(_start(worker), job)
    assert all(torch.equal(res.update[k], again.update[k]) for k in res.update)
