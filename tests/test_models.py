"""Models: ``model.name`` errors, seeded LoRA init, FFA, LoRA state load/save (tiny-llama
preset only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from dplora_ray.config import LoraSection, ModelConfig
from dplora_ray.errors import ModelError
from dplora_ray.models import (
    build_lora_model,
    load_base_model,
    load_lora_state_inplace,
    lora_state,
    prepare_model,
    save_adapter,
)

LORA = LoraSection(r=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
FFA = LoraSection(r=4, alpha=8.0, target_modules=("q_proj", "v_proj"), train_a=False)
# tiny-llama: 2 layers, hidden 32, 4 heads of 8, 2 KV heads -> v_proj out 16
SHAPES = {
    "q_proj.lora_A.weight": (4, 32),
    "q_proj.lora_B.weight": (32, 4),
    "v_proj.lora_A.weight": (4, 32),
    "v_proj.lora_B.weight": (16, 4),
}


def _base() -> Any:
    model, _ = load_base_model(ModelConfig(name="tiny-llama"))
    return model


def _lora(lora: LoraSection = LORA, seed: int = 0) -> Any:
    return build_lora_model(_base(), lora, seed=seed)


def _random_like(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) for k, v in state.items()}


def _expected_keys(factors: tuple[str, ...]) -> list[str]:
    return sorted(
        f"base_model.model.model.layers.{layer}.self_attn.{mod}.{f}.weight"
        for layer in (0, 1)
        for mod in ("q_proj", "v_proj")
        for f in factors
    )


# --------------------------------------------------------------------------- model.name
@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("tiny-lama", "unknown preset"),
        ("./nope", "no such local folder"),
        ("/definitely/not/here", "no such local folder"),
        ("a/b/c", "no such local folder"),
    ],
)
def test_prepare_model_rejects_bad_names(name: str, fragment: str) -> None:
    # Execute
    with pytest.raises(ModelError) as info:
        prepare_model(ModelConfig(name=name))

    # Assert
    assert info.value.key == "model.name"
    assert str(info.value).startswith(f"model.name={name!r}: ")
    assert fragment in str(info.value)


def test_prepare_model_rejects_folder_without_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no config.json"):
        prepare_model(ModelConfig(name=str(tmp_path)))


def test_hub_id_while_offline_names_the_key_and_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    # Execute
    with pytest.raises(ModelError) as info:
        prepare_model(ModelConfig(name="someone/some-model"))

    # Assert
    msg = str(info.value)
    assert msg.startswith("model.name='someone/some-model': ")
    assert "HF_HUB_OFFLINE=1" in msg
    assert "local checkpoint folder" in msg  # the hint


def test_tiny_preset_is_a_local_checkpoint() -> None:
    # Execute
    folder = Path(prepare_model(ModelConfig(name="tiny-llama")))

    # Assert
    assert (folder / "config.json").is_file()
    assert prepare_model(ModelConfig(name=str(folder))) == str(folder.resolve())


def test_base_model_is_frozen_and_in_eval_mode() -> None:
    # Execute
    model, tok = load_base_model(ModelConfig(name="tiny-llama"))

    # Assert
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training
    assert tok.padding_side == "right"
    assert tok.pad_token is not None


# --------------------------------------------------------------------------- LoRA init
def test_lora_init_depends_only_on_the_seed() -> None:
    # Prepare
    torch.manual_seed(123)
    global_before = torch.random.get_rng_state()

    # Execute
    a = lora_state(_lora(seed=5), trainable_only=False)
    b = lora_state(_lora(seed=5), trainable_only=False)
    c = lora_state(_lora(seed=6), trainable_only=False)

    # Assert
    assert list(a) == list(b) == list(c) == _expected_keys(("lora_A", "lora_B"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    a_keys = [k for k in a if ".lora_A." in k]
    assert all(not torch.equal(a[k], c[k]) for k in a_keys)  # B starts at zero (peft)
    assert torch.equal(torch.random.get_rng_state(), global_before)  # global RNG untouched


def test_lora_shapes_and_trainable_keys() -> None:
    # Execute
    model = _lora()
    state = lora_state(model, trainable_only=True)

    # Assert
    assert list(state) == _expected_keys(("lora_A", "lora_B"))
    for k, v in state.items():
        suffix = ".".join(k.split(".")[-3:])
        assert tuple(v.shape) == SHAPES[suffix], k
        assert v.dtype == torch.float32
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 8 and all("lora_" in n for n in trainable)


def test_ffa_trains_only_b() -> None:
    # Execute
    model = _lora(FFA)

    # Assert
    trainable = sorted(
        n.replace(".default.", ".") for n, p in model.named_parameters() if p.requires_grad
    )
    assert trainable == _expected_keys(("lora_B",))
    assert list(lora_state(model, trainable_only=True)) == _expected_keys(("lora_B",))
    assert len(lora_state(model, trainable_only=False)) == 8  # frozen A is still there


def test_unknown_target_module_is_a_model_error() -> None:
    with pytest.raises(ModelError) as info:
        _lora(LoraSection(target_modules=("q_proj", "nope_proj")))
    assert info.value.key == "lora.target_modules"
    assert "'nope_proj'" in str(info.value)


# --------------------------------------------------------------------------- state load
def test_load_lora_state_round_trip() -> None:
    # Prepare
    model = _lora()
    new = _random_like(lora_state(model, trainable_only=False), seed=1)

    # Execute
    load_lora_state_inplace(model, new)
    back = lora_state(model, trainable_only=False)

    # Assert: every key was actually loaded (peft's own loader skips wrong keys silently)
    assert list(back) == sorted(new)
    for k in new:
        assert torch.equal(back[k], new[k]), k


def test_load_lora_state_accepts_numpy_and_partial_state() -> None:
    # Prepare: FFA sends only B; A must stay at its init
    model = _lora(FFA)
    before = lora_state(model, trainable_only=False)
    new_b = _random_like(lora_state(model, trainable_only=True), seed=2)

    # Execute
    load_lora_state_inplace(model, {k: v.numpy() for k, v in new_b.items()})
    after = lora_state(model, trainable_only=False)

    # Assert
    for k in after:
        expected = new_b[k] if k in new_b else before[k]
        assert torch.equal(after[k], expected), k


def test_load_lora_state_rejects_a_wrong_key() -> None:
    # Prepare
    model = _lora()
    state = lora_state(model, trainable_only=False)
    key = next(iter(state))
    bad = {key.replace("lora_A", "lora_C"): state[key]}

    # Execute / Assert
    with pytest.raises(ValueError, match="keys the model lacks"):
        load_lora_state_inplace(model, bad)


def test_load_lora_state_rejects_peft_adapter_name_keys() -> None:
    # Prepare: in-memory parameter names (with ".default.") are not file keys
    model = _lora()
    name, p = next((n, p) for n, p in model.named_parameters() if "lora_A" in n)

    # Execute / Assert
    with pytest.raises(ValueError, match="keys the model lacks"):
        load_lora_state_inplace(model, {name: torch.zeros_like(p)})


def test_load_lora_state_rejects_a_wrong_shape() -> None:
    # Prepare
    model = _lora()
    state = lora_state(model, trainable_only=False)
    key = _expected_keys(("lora_A",))[0]
    before = state[key].clone()

    # Execute
    with pytest.raises(ValueError, match=r"shape \(4, 31\) != \(4, 32\)"):
        load_lora_state_inplace(model, {key: torch.ones(4, 31)})

    # Assert
    assert torch.equal(lora_state(model, trainable_only=False)[key], before)


def test_load_lora_state_copies_nothing_when_a_later_shape_is_wrong() -> None:
    # Prepare: every key right but the last one's shape
    model = _lora()
    before = lora_state(model, trainable_only=False)
    new = _random_like(before, seed=7)
    last = list(new)[-1]
    new[last] = torch.ones(3, 3)

    # Execute
    with pytest.raises(ValueError, match="shape"):
        load_lora_state_inplace(model, new)

    # Assert: peft's loader was never reached
    after = lora_state(model, trainable_only=False)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_lora_param_items_are_the_live_parameters() -> None:
    from dplora_ray.models import lora_param_items

    model = _lora(FFA)
    items = lora_param_items(model)
    live = {id(p) for _, p in model.named_parameters()}
    assert [k for k, _ in items] == _expected_keys(("lora_A", "lora_B"))
    assert all(id(p) in live for _, p in items)
    assert [k for k, p in items if p.requires_grad] == _expected_keys(("lora_B",))


def test_lora_state_refuses_the_opacus_wrapper() -> None:
    from opacus import GradSampleModule

    model = _lora()
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    with pytest.raises(TypeError, match=r"grad_sample_module\._module"):
        lora_state(wrapped, trainable_only=False)
    assert list(lora_state(wrapped._module, trainable_only=False)) == _expected_keys(
        ("lora_A", "lora_B"))


# --------------------------------------------------------------------------- adapters
@pytest.mark.parametrize("lora", [LORA, FFA], ids=["lora", "ffa"])
def test_saved_adapter_loads_with_peft(tmp_path: Path, lora: LoraSection) -> None:
    from peft import PeftModel

    # Prepare: random B (and A unless FFA, where A keeps its seeded init)
    model = _lora(lora, seed=3)
    full = lora_state(model, trainable_only=False)
    full.update(_random_like(lora_state(model, trainable_only=True), seed=4))
    source = prepare_model(ModelConfig(name="tiny-llama"))

    # Execute
    save_adapter(tmp_path / "adapter", lora, source, full)
    loaded = PeftModel.from_pretrained(_base(), str(tmp_path / "adapter"))
    back = lora_state(loaded, trainable_only=False)

    # Assert
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert list(back) == list(full)
    for k in full:
        assert torch.equal(back[k], full[k]), k
    assert loaded.peft_config["default"].r == 4
    assert loaded.peft_config["default"].lora_alpha == 8.0
