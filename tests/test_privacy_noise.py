"""Clipping and Gaussian noise on named tensors."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from dplora_ray.errors import PrivacyError
from dplora_ray.privacy import (
    NonFiniteUpdateError,
    add_gaussian_noise,
    clip_by_global_norm,
    global_l2_norm,
)


def _update() -> dict[str, torch.Tensor]:
    # global norm sqrt(3^2 + 0^2 + 4^2) = 5
    return {"lora_A": torch.tensor([3.0, 0.0]), "lora_B": torch.tensor([[4.0]])}


def test_global_norm_by_hand():
    assert global_l2_norm(_update()) == 5.0
    assert global_l2_norm({}) == 0.0
    assert global_l2_norm({"x": torch.full((4,), 0.5, dtype=torch.bfloat16)}) == 1.0


def test_clip_scales_all_tensors_together():
    # Prepare
    update = _update()
    # Execute
    clipped, norm = clip_by_global_norm(update, 1.0)
    # Assert: factor C / norm = 1/5
    assert norm == 5.0
    torch.testing.assert_close(clipped["lora_A"], torch.tensor([0.6, 0.0]))
    torch.testing.assert_close(clipped["lora_B"], torch.tensor([[0.8]]))
    assert global_l2_norm(clipped) <= 1.0
    torch.testing.assert_close(update["lora_A"], torch.tensor([3.0, 0.0]))  # not mutated


def test_clip_below_threshold_returns_equal_copies():
    update = _update()
    clipped, norm = clip_by_global_norm(update, 10.0)
    assert norm == 5.0
    for k in update:
        assert torch.equal(clipped[k], update[k])
        assert clipped[k].data_ptr() != update[k].data_ptr()


def test_zero_norm_is_returned_unchanged():
    zeros = {"a": torch.zeros(3), "b": torch.zeros(2, 2)}
    clipped, norm = clip_by_global_norm(zeros, 1.0)
    assert norm == 0.0
    assert all(torch.equal(clipped[k], zeros[k]) for k in zeros)
    assert all(torch.isfinite(t).all() for t in clipped.values())


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_norm_raises(bad):
    update = {"a": torch.tensor([1.0, bad]), "b": torch.ones(2)}
    with pytest.raises(NonFiniteUpdateError, match="non-finite") as info:
        clip_by_global_norm(update, 1.0)
    assert isinstance(info.value, PrivacyError)


def test_non_finite_error_pickles():
    err = NonFiniteUpdateError(math.nan, "update of client-3")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is NonFiniteUpdateError
    assert str(back) == str(err) and "client-3" in str(back)


@pytest.mark.parametrize("c", [0.0, -1.0, math.inf, math.nan])
def test_bad_clipping_norm(c):
    with pytest.raises(PrivacyError, match="clipping_norm must be a finite number > 0"):
        clip_by_global_norm(_update(), c)


def test_clip_float16_stays_within_bound():
    g = torch.Generator().manual_seed(0)
    update = {"a": torch.randn(1000, generator=g).to(torch.float16) * 37}
    clipped, _ = clip_by_global_norm(update, 0.3)
    assert clipped["a"].dtype == torch.float16
    assert global_l2_norm(clipped) <= 0.3


def test_noise_has_the_configured_std_and_zero_mean():
    # Prepare
    n, std = 200_000, 0.7
    zeros = {"a": torch.zeros(n // 2), "b": torch.zeros(n // 4, 2)}
    # Execute
    noised = add_gaussian_noise(zeros, std, torch.Generator().manual_seed(1))
    # Assert
    sample = torch.cat([t.flatten() for t in noised.values()]).double()
    assert sample.std().item() == pytest.approx(std, rel=0.02)
    assert abs(sample.mean().item()) < 5 * std / math.sqrt(n)
    assert all(torch.equal(zeros[k], torch.zeros_like(zeros[k])) for k in zeros)  # untouched


def test_same_seed_same_noise_whatever_the_key_order():
    update = _update()
    reordered = {"lora_B": update["lora_B"], "lora_A": update["lora_A"]}
    a = add_gaussian_noise(update, 0.5, torch.Generator().manual_seed(42))
    b = add_gaussian_noise(reordered, 0.5, torch.Generator().manual_seed(42))
    c = add_gaussian_noise(update, 0.5, torch.Generator().manual_seed(43))
    assert list(a) == ["lora_A", "lora_B"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lora_A"], c["lora_A"])


def test_noise_keeps_dtype_and_shape_and_zero_std_is_identity():
    update = {"a": torch.ones(3, 2, dtype=torch.bfloat16), "b": torch.ones(4, dtype=torch.float64)}
    noised = add_gaussian_noise(update, 0.1, torch.Generator().manual_seed(0))
    assert noised["a"].dtype == torch.bfloat16 and noised["a"].shape == (3, 2)
    assert noised["b"].dtype == torch.float64
    same = add_gaussian_noise(update, 0.0, torch.Generator().manual_seed(0))
    assert all(torch.equal(same[k], update[k]) for k in update)


def test_noise_argument_errors():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(PrivacyError, match="std must be a finite number >= 0"):
        add_gaussian_noise(_update(), -1.0, g)
    with pytest.raises(PrivacyError, match="generator must be a torch.Generator"):
        add_gaussian_noise(_update(), 1.0, None)  # type: ignore[arg-type]
    with pytest.raises(PrivacyError, match="floating dtype"):
        add_gaussian_noise({"i": torch.ones(2, dtype=torch.int64)}, 1.0, g)
