"""DP-AdamBC: Adam whose second moment has the known DP noise variance removed.

Tang, Shpilevskiy and Lécuyer (AAAI 2024), "DP-AdamBC: Your DP-Adam Is Actually DP-SGD
(Unless You Apply Bias Correction)": the privatised gradient is the clipped mean plus
Gaussian noise of known per-coordinate variance ``Phi``, so Adam's second moment
estimates ``E[g^2] + Phi`` and, when the noise dominates, Adam degenerates into SGD
scaled by ``1 / sqrt(Phi)``. DP-AdamBC steps with

    m_hat / sqrt(max(v_hat - Phi, gamma))

``Phi`` is what the mechanism adds to the gradient the optimizer sees: ``(sigma C / B)^2``
for DP-SGD (noise ``N(0, sigma^2 C^2)`` on the sum of clipped per-example gradients,
divided by the expected batch ``B``), ``(sigma C)^2`` for the paper's mechanism (noise
on the clipped batch mean), 0 without noise on the gradient. It only reads the released
(noised) gradient, so it is post-processing and costs no privacy.

``gamma`` floors the denominator: where the noise leaves ``v_hat - Phi`` at or below
zero the step is ``m_hat / sqrt(gamma)``, so ``gamma`` bounds the largest step. With
few steps per round (clients are stateless: the state restarts every round) ``v_hat``
is a noisy estimate and the floor is reached often; docs/reproduction.md has the
measurement.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

__all__ = ["DPAdamBC"]


class DPAdamBC(torch.optim.Optimizer):
    """Adam with the DP noise variance subtracted from the second moment.

    Args:
        params: the parameters (or parameter groups).
        lr: learning rate.
        noise_variance: ``Phi``, the per-coordinate variance of the noise in the
            gradient this optimizer sees (>= 0).
        gamma: the floor of ``v_hat - Phi`` (> 0).
        betas: Adam's moment decay rates.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, *,
                 noise_variance: float, gamma: float = 1e-8,
                 betas: tuple[float, float] = (0.9, 0.999)) -> None:
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be > 0, got {lr}")
        if not (math.isfinite(noise_variance) and noise_variance >= 0):
            raise ValueError(f"noise_variance must be >= 0, got {noise_variance}")
        if not (math.isfinite(gamma) and gamma > 0):
            raise ValueError(f"gamma must be > 0, got {gamma}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        defaults = {"lr": lr, "noise_variance": noise_variance, "gamma": gamma,
                    "betas": betas}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            phi, gamma, lr = group["noise_variance"], group["gamma"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.to(torch.float32)
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(p, dtype=torch.float32)
                    state["v"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                t = state["step"]
                m, v = state["m"], state["v"]
                m.mul_(b1).add_(g, alpha=1.0 - b1)
                v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
                m_hat = m / (1.0 - b1 ** t)
                v_hat = v / (1.0 - b2 ** t)
                denom = (v_hat - phi).clamp_min(gamma).sqrt()
                p.add_((m_hat / denom).to(p.dtype), alpha=-lr)
        return loss
