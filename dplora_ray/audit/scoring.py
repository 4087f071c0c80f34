"""Scoring the audit's sequences inside a client worker (which holds the base model).

Runs in the worker process (``RuntimeWorker.audit_scores`` calls :func:`score_chunks`):
it loads the given LoRA state and returns, for each sequence, the log-softmax over the
task's label words at the last prompt token, exactly the distribution the training loss
(``ClientWorker.loss``) and the evaluation use. Each chunk is scored as one batch, so
the numbers do not depend on which worker scored which chunk.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from dplora_ray.federated.encoding import EncodedSplit

__all__ = ["score_chunks"]


@torch.inference_mode()
def score_chunks(worker: Any, state: Mapping[str, torch.Tensor],
                 chunks: Sequence[EncodedSplit]) -> list[np.ndarray]:
    """Label log-probabilities ``[len(chunk), num_labels]`` (float64) for each chunk.

    Args:
        worker: a :class:`~dplora_ray.federated.client.ClientWorker`.
        state: LoRA tensors to load (trainable keys; the untrained init scores as the
            frozen base model, since B = 0).
        chunks: the sequences, each scored as one batch.
    """
    worker.load_global(state)
    worker.model.eval()
    out = []
    for chunk in chunks:
        if len(chunk) == 0:
            out.append(np.zeros((0, len(worker.label_ids))))
            continue
        batch = chunk.batch(np.arange(len(chunk)), worker.data.pad_id)
        logits = worker.label_logits(batch, train=False).float()
        out.append(torch.log_softmax(logits, dim=-1).cpu().double().numpy())
    return out
