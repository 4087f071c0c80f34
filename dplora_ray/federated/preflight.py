"""The preflight: one private step on a synthetic batch before training.

Random tokens, so nothing private is touched and nothing needs accounting. It fails
(:class:`~dplora_ray.errors.PreflightError`) if a trainable LoRA tensor got no
per-sample gradient (DP-SGD) or no gradient (other modes), or did not change after a
private step (``dpsgd``, ``paper``): LoRA off the classifier path, or tensors cut off
from Opacus (cf. opacus issue 820). The parameters are restored afterwards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from dplora_ray.errors import PreflightError
from dplora_ray.privacy.streams import PublicStream, public_seed

if TYPE_CHECKING:
    from dplora_ray.federated.client import ClientWorker

__all__ = ["run_preflight"]


def run_preflight(self: ClientWorker) -> dict[str, Any]:
    """One private step on a synthetic batch (random tokens, so nothing private is
    touched and nothing needs accounting); fails if a trainable LoRA tensor got no
    per-sample gradient or did not change. Parameters are restored afterwards."""
    mech = self.mech
    before = {k: p.detach().clone() for k, p in self._params.items()}
    # public randomness: the batch is synthetic and the step is undone afterwards, so
    # nothing is released and no secret is needed
    gen = torch.Generator().manual_seed(public_seed(self.cfg.seed, PublicStream.PREFLIGHT))
    vocab = self._base().get_input_embeddings().weight.shape[0]
    bsz, width = 4, 12
    rows = bsz * self.choices
    n_labels = self.choices if self.task_type == "multiple_choice" else len(self.label_ids)
    batch = {
        "input_ids": torch.randint(3, vocab, (rows, width), generator=gen),
        "attention_mask": torch.ones(rows, width, dtype=torch.long),
        "last_index": torch.full((rows,), width - 1, dtype=torch.long),
        "labels": torch.randint(0, max(1, n_labels), (bsz,), generator=gen),
    }
    if self.task_type != "classification":  # the second half of each row is target
        batch["target_mask"] = (torch.arange(width) >= width // 2).long().expand(
            rows, width).clone()
    params = list(self._params.values())
    problems: list[str] = []
    self.model.train()
    try:
        if mech.local_training == "dpsgd":
            from dplora_ray.privacy.dpsgd import Float32ClipDPOptimizer

            dp_opt = Float32ClipDPOptimizer(
                torch.optim.SGD(params, lr=0.1), noise_multiplier=1.0,
                max_grad_norm=self.cfg.privacy.clipping_norm, expected_batch_size=bsz,
                loss_reduction="mean",
                generator=torch.Generator(device=self.device).manual_seed(
                    public_seed(self.cfg.seed, PublicStream.PREFLIGHT, 1)))
            dp_opt.zero_grad(set_to_none=True)
            failure = None
            try:
                (self._batch_loss(batch).mean() / self.choices).backward()
                self._fold_grad_samples()
            except (IndexError, RuntimeError, ValueError) as exc:  # Opacus' hooks
                failure = f"per-sample gradients failed ({type(exc).__name__}: {exc})"
            for k, p in self._params.items():
                gs = getattr(p, "grad_sample", None)
                if gs is None or gs.shape[0] != bsz:
                    problems.append(f"{k}: no per-sample gradient")
            if failure is not None:
                problems.append(failure)
            if not problems:  # DPOptimizer raises on a missing per-sample gradient
                dp_opt.step()
            dp_opt.zero_grad(set_to_none=True)
        else:
            opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=0.1)
            opt.zero_grad(set_to_none=True)
            self._batch_loss(batch).mean().backward()
            for k, p in self._params.items():
                if p.grad is None:
                    problems.append(f"{k}: no gradient")
            if mech.local_training == "paper":
                self._paper_noise_inplace(self.cfg.privacy.clipping_norm, 1.0,
                                          torch.Generator().manual_seed(public_seed(
                                              self.cfg.seed, PublicStream.PREFLIGHT, 1)))
            opt.step()
            opt.zero_grad(set_to_none=True)
        if mech.local_training != "plain" and not problems:  # noise moves every tensor
            for k, p in self._params.items():
                if torch.equal(p.detach(), before[k]):
                    problems.append(f"{k}: unchanged after a private step")
    finally:
        self.model.eval()
        with torch.no_grad():
            for k, p in self._params.items():
                p.copy_(before[k])
    if problems:
        label = "privacy preflight" if mech.private else "preflight"
        raise PreflightError(f"{label} ({mech.name}) failed for "
                             f"{len(problems)} LoRA tensor(s); first: {problems[0]}")
    return {"checked_tensors": len(self._params), "mode": mech.name}
