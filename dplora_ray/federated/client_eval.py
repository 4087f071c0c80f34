"""Evaluation inside a client worker: per-example losses and predictions on test
examples, and greedy answers for generation tasks (the worker holds the model)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from dplora_ray.federated.client import ClientWorker

__all__ = ["evaluate_detail"]


@torch.inference_mode()
def evaluate_detail(self: ClientWorker, state: Mapping[str, torch.Tensor], index: np.ndarray,
                    batch_size: int = 32, generate: bool = True) -> dict[str, Any]:
    """:meth:`evaluate` plus, for generation tasks, per example the summed answer NLL
    (``nll``), its token count (``tokens``) and, with ``generate``, the greedy answer's
    token ids (``generated``, at most ``data.max_new_tokens``, cut at the first
    end-of-sequence token)."""
    self._load_global(state)
    self.model.eval()
    index = np.asarray(index, dtype=np.int64)
    split = self.data.test
    order = index[np.argsort(split.lengths()[index], kind="stable")]
    n = len(index)
    out: dict[str, Any] = {"loss": np.zeros(n), "pred": np.zeros(n, dtype=np.int64)}
    gen_task = self.task_type == "generation"
    if gen_task:
        out.update(nll=np.zeros(n), tokens=np.zeros(n, dtype=np.int64))
        if generate:
            out["generated"] = [None] * n
    pos = {int(i): j for j, i in enumerate(index)}
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        at = [pos[int(i)] for i in chunk]
        batch = split.batch(chunk, self.data.pad_id)
        if self.task_type == "classification":
            logits = self._logits(batch, train=False).float().cpu()
            out["loss"][at] = F.cross_entropy(logits, batch["labels"],
                                              reduction="none").numpy()
            out["pred"][at] = logits.argmax(dim=1).numpy()
            continue
        total, count = (t.double().cpu() for t in self._target_logprobs(batch, False))
        if self.task_type == "multiple_choice":
            scores = total.view(-1, self.choices)
            out["loss"][at] = F.cross_entropy(scores, batch["labels"],
                                              reduction="none").numpy()
            out["pred"][at] = scores.argmax(dim=1).numpy()
            continue
        out["nll"][at] = (-total).numpy()
        out["tokens"][at] = count.numpy().astype(np.int64)
        out["loss"][at] = (-total / count.clamp_min(1.0)).numpy()
        if generate:
            for j, ids in zip(at, _generate(self, split.prompt_batch(chunk,
                                                                     self.data.pad_id))):
                out["generated"][j] = ids
    return out

def _generate(self: ClientWorker, prompts: Mapping[str, torch.Tensor]) -> list[np.ndarray]:
    """Greedy answers (token ids, end-of-sequence and after removed)."""
    eos = self.data.eos_id
    ids = prompts["input_ids"].to(self.device)
    gen = self.model.generate(
        input_ids=ids, attention_mask=prompts["attention_mask"].to(self.device),
        max_new_tokens=self.cfg.data.max_new_tokens, do_sample=False,
        pad_token_id=self.data.pad_id, eos_token_id=eos)
    out = []
    for row in gen[:, ids.shape[1]:].cpu().numpy():
        stop: Any = np.flatnonzero(row == eos) if eos is not None else []
        out.append(row[:stop[0]] if len(stop) else row)
    return out
