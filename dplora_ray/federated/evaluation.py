"""Evaluating the global adapter on the test split, over the worker pool.

The test split is cut into fixed chunks of one global length-sorted order
(:func:`eval_chunks`), dealt to the workers with :func:`~dplora_ray.federated.pool.scatter`;
the merged per-example results give one :class:`~dplora_ray.results.EvalResult`.
Evaluation spends no privacy (the test split is no client's data). The same chunks
whatever the number of workers, so the figures do not depend on it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from dplora_ray.federated.planning import RunPlan
from dplora_ray.federated.pool import WorkerPool, scatter
from dplora_ray.results import EvalResult

__all__ = ["EVAL_BATCH_SIZE", "eval_chunks", "evaluate"]

EVAL_BATCH_SIZE = 32


def eval_chunks(plan: RunPlan) -> list[np.ndarray]:
    order = np.argsort(plan.data.test.lengths(), kind="stable")
    return [order[s:s + EVAL_BATCH_SIZE] for s in range(0, len(order), EVAL_BATCH_SIZE)]


def evaluate(pool: WorkerPool, plan: RunPlan, chunks: list[np.ndarray], state_ref: Any, *,
             max_losses: int, note: Any = None) -> EvalResult:
    """Loss, accuracy, macro-F1, weighted F1, perplexity and ROUGE-L of the adapter in
    ``state_ref`` on the test split (what the task type does not have is NaN)."""
    from dplora_ray.data.metrics import f1_macro, f1_weighted, perplexity, rouge_l

    test = plan.data.test
    parts = scatter(pool, "evaluate_chunks", state_ref, chunks, max_losses=max_losses,
                    what="evaluation", note=note)
    merged: dict[str, Any] = {}
    for where, part in zip(chunks, parts):
        for key, values in part.items():
            if key not in merged:
                merged[key] = ([None] * len(test) if isinstance(values, list)
                               else np.zeros(len(test), dtype=values.dtype))
            if isinstance(values, list):
                for i, v in zip(where, values):
                    merged[key][i] = v
            else:
                merged[key][where] = values
    if plan.data.task_type == "generation":
        tokens = merged["tokens"]
        ppl = perplexity(merged["nll"], tokens)
        loss = float(merged["nll"].sum() / max(1, tokens.sum()))  # per answer token
        tok = plan.tokenizer
        answers = [tok.decode(ids, skip_special_tokens=True) for ids in merged["generated"]]
        return EvalResult(loss=loss, perplexity=ppl,
                          rouge_l=rouge_l(answers, plan.references or []))
    losses, preds = merged["loss"], merged["pred"]
    y, k = test.labels, plan.data.num_labels
    return EvalResult(loss=float(losses.mean()), accuracy=float((preds == y).mean()),
                      f1_macro=f1_macro(y, preds, k), f1_weighted=f1_weighted(y, preds, k),
                      perplexity=math.nan, rouge_l=math.nan)
