"""The base model's keys (issue 18): ``model.dtype``, ``model.quantization``,
``model.gradient_checkpointing`` in configs, on workers and on resume; and the memory
estimate of ``dplora-ray resources`` (its activation formula checked against the bytes
autograd really saves on tiny-llama; against measured RSS on SmolLM2 in
``python -m benchmarks.resources_check``, the slow test at the end)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dplora_ray.cli import main
from dplora_ray.config import ExperimentConfig, load_config
from dplora_ray.errors import ConfigError, ModelError
from dplora_ray.federated.checkpoint import compare_configs
from dplora_ray.hardware import check_worker_support, load_kwargs, quantization_config
from dplora_ray.resources import (
    GIB,
    check_fits,
    estimate,
    layer_bytes,
    model_shape,
    placement,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
LLAMA_7B = ROOT / "configs" / "model_shapes" / "llama-2-7b"


def _cfg(*overrides: str) -> ExperimentConfig:
    return load_config(TINY, ["runtime.backend=inline", *overrides])


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize(("overrides", "key", "words"), [
    (["model.dtype=float64"], "model.dtype", "must be one of"),
    (["model.quantization=2bit"], "model.quantization", "must be one of"),
    (["model.gradient_checkpointing=maybe"], "model.gradient_checkpointing", "true or false"),
    (["model.quantization=4bit"], "model.quantization", "needs GPU workers"),
    (["model.dtype=bfloat16", "federation.strategy=full"], "model.dtype",
     "strategy=full trains the base weights"),
    (["model.dtype=float16", "runtime.bf16_autocast=true"], "model.dtype",
     "mixes float16 and bfloat16"),
])
def test_bad_base_model_keys_are_one_line_errors(
        overrides: list[str], key: str, words: str, capsys: pytest.CaptureFixture) -> None:
    # Execute
    code = main(["train", str(TINY), "--no-progress", *sum((["--set", o] for o in overrides),
                                                            [])])

    # Assert
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"dplora-ray: error: {key}=") and words in err[0]


def test_quantization_on_a_cpu_worker_is_refused_before_loading(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Execute: GPU workers asked for, but the (inline) worker has no CUDA device
    code = main(["train", str(TINY), "--no-progress", "--out", str(tmp_path / "run"),
                 "--set", "model.quantization=4bit", "--set", "runtime.gpus_per_worker=1",
                 "--set", "runtime.backend=inline"])

    # Assert: one error line (after the runner's own progress line), no traceback
    text = capsys.readouterr().err
    err = [ln for ln in text.splitlines() if ln.startswith("dplora-ray:")]
    assert code == 2 and len(err) == 1 and "Traceback" not in text
    assert err[0].startswith("dplora-ray: error: model.quantization='4bit': needs a CUDA GPU")
    assert not (tmp_path / "run").exists()


def test_quantization_without_bitsandbytes_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a CUDA device as far as the check knows, no bitsandbytes
    import importlib.util

    cfg = _cfg("model.quantization=8bit", "runtime.gpus_per_worker=1").model
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)

    # Execute / Assert
    with pytest.raises(ModelError, match="needs the bitsandbytes package"):
        check_worker_support(cfg, torch.device("cuda"))
    check_worker_support(_cfg().model, torch.device("cpu"))  # nothing to refuse


def test_load_kwargs_by_dtype_and_quantization() -> None:
    # Execute
    plain = load_kwargs(_cfg("model.dtype=bfloat16").model, torch.device("cpu"))
    q4 = quantization_config(_cfg("model.quantization=4bit", "runtime.gpus_per_worker=1").model)
    q8 = quantization_config(_cfg("model.quantization=8bit", "runtime.gpus_per_worker=1").model)

    # Assert: QLoRA's NF4 with bf16 compute; LLM.int8 for 8 bits
    assert plain == {"dtype": torch.bfloat16}
    assert q4.load_in_4bit and q4.bnb_4bit_quant_type == "nf4"
    assert q4.bnb_4bit_compute_dtype == torch.bfloat16 and q4.bnb_4bit_use_double_quant
    assert q8.load_in_8bit and not q8.load_in_4bit


def test_resume_refuses_a_new_dtype_and_accepts_checkpointing(tmp_path: Path) -> None:
    # Prepare
    saved = _cfg()

    # Execute / Assert: the dtype changes what is computed, checkpointing does not
    with pytest.raises(ConfigError, match=r"^model\.dtype='bfloat16': differs from the run"):
        compare_configs(saved, _cfg("model.dtype=bfloat16"), tmp_path)
    gpu = ["runtime.gpus_per_worker=1"]
    with pytest.raises(ConfigError, match=r"^model\.quantization='4bit': differs"):
        compare_configs(_cfg(*gpu), _cfg(*gpu, "model.quantization=4bit"), tmp_path)
    assert compare_configs(saved, _cfg("model.gradient_checkpointing=true"), tmp_path) == [
        "model.gradient_checkpointing: False -> True"]


# --------------------------------------------------------------------------- resources
def _saved_bytes(cfg: ExperimentConfig, batch: int, length: int) -> float:
    """Bytes autograd saves and Opacus captures (parameters excluded) in the worker's
    DP-SGD forward on a batch of random tokens, checkpointing and autocast as ``cfg``
    says."""
    from dplora_ray.hardware import enable_gradient_checkpointing, grad_sample_module
    from dplora_ray.models import build_lora_model, load_base_model

    base, _ = load_base_model(cfg.model)
    model = build_lora_model(base, cfg.lora, seed=0)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model.get_base_model())
    grad_sample_module(model)  # DP-SGD: Opacus keeps the LoRA modules' inputs
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(3, 400, (batch, length), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.runtime.bf16_autocast):
        model.get_base_model().get_decoder()(input_ids=ids,
                                             attention_mask=torch.ones_like(ids))
    for module in model.modules():
        for inputs in getattr(module, "activations", None) or []:
            for t in inputs:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return float(sum(v for k, v in seen.items() if k not in params))


@pytest.mark.parametrize("overrides", [
    [], ["lora.train_a=false"], ["model.dtype=bfloat16"],
    ["model.dtype=bfloat16", "lora.train_a=false"], ["runtime.bf16_autocast=true"],
    ["lora.target_modules=[q_proj,v_proj,gate_proj,down_proj]"],
    ["model.gradient_checkpointing=true"], ["model.gradient_checkpointing=true",
                                            "model.dtype=bfloat16"],
], ids=lambda o: ",".join(o) or "float32")
def test_activation_formula_matches_what_autograd_saves(overrides: list[str]) -> None:
    # Prepare
    cfg = _cfg(*overrides)
    shape = model_shape(cfg.model, cfg.lora.target_modules)
    batch, length = 6, 40
    full, kept = layer_bytes(cfg, shape)
    copies = (2.0 * shape.layer_parameters if cfg.runtime.bf16_autocast else 0.0)
    want = shape.layers * batch * length * (kept if cfg.model.gradient_checkpointing else full)
    want += 4 * shape.hidden * batch * length  # the final norm's input

    # Execute
    got = _saved_bytes(cfg, batch, length)

    # Assert
    want += 0 if cfg.model.gradient_checkpointing else copies
    assert got == pytest.approx(want, rel=0.1)


def test_estimate_components() -> None:
    # Prepare
    cfg = _cfg("privacy.mode=dpsgd", "privacy.target_epsilon=8",
               "runtime.max_physical_batch_size=4")
    shape = model_shape(cfg.model, cfg.lora.target_modules)

    # Execute
    f32 = estimate(cfg, shape)
    bf16 = estimate(_cfg("model.dtype=bfloat16", "privacy.mode=dpsgd",
                         "runtime.max_physical_batch_size=4"), shape)
    q4 = estimate(_cfg("model.quantization=4bit", "runtime.gpus_per_worker=1"), shape)

    # Assert: tiny-llama has 896 LoRA parameters (tests/test_client.py), all trainable
    assert f32.weights == 4 * shape.parameters and bf16.weights == 2 * shape.parameters
    assert q4.weights < 0.6 * f32.weights
    assert f32.batch == 4 and f32.batch_source == "runtime.max_physical_batch_size"
    assert f32.per_sample_grads == 4 * 4 * 896
    assert f32.lora_state == 4 * (896 + 896 * (1 + 2 + 1))  # grad, AdamW, summed
    assert f32.activations_checkpointed < f32.activations
    assert f32.total(True) < f32.total(False)


def test_placement() -> None:
    assert placement(18 * GIB, 80 * GIB) == (4, 0.25)
    assert placement(25 * GIB, 80 * GIB) == (3, 0.3333)
    assert placement(150 * GIB, 80 * GIB) == (0, 2.0)


def test_a_gpu_share_too_small_is_refused_in_one_line() -> None:
    # Prepare: four workers on a (pretend) 8 GiB GPU, a 7B bf16 base each
    cfg = _cfg(f"model.name={LLAMA_7B}", "model.dtype=bfloat16",
               "runtime.gpus_per_worker=0.25")

    # Execute / Assert
    with pytest.raises(ConfigError) as err:
        check_fits(cfg, 8 * GIB)
    text = str(err.value)
    assert text.startswith("runtime.gpus_per_worker=0.25: one worker needs about ")
    assert "\n" not in text and "not implemented yet" in text
    check_fits(_cfg("runtime.gpus_per_worker=0.25"), 8 * GIB)  # tiny-llama fits


def test_resources_command_prints_the_table(capsys: pytest.CaptureFixture) -> None:
    # Execute
    code = main(["resources", str(TINY), "--gpu-memory-gb", "80",
                 "--set", f"model.name={LLAMA_7B}", "--set", "model.dtype=bfloat16",
                 "--set", "model.max_length=512"])

    # Assert
    out = capsys.readouterr().out
    assert code == 0
    assert "6,738.4M parameters, 32 layers, hidden 4096; base bfloat16" in out
    for row in ("| weights ", "| LoRA state", "| per-sample gradients", "| activations",
                "| runtime overhead", "| total"):
        assert row in out
    assert "runtime.gpus_per_worker=" in out


def test_resources_command_bad_input_is_one_line(capsys: pytest.CaptureFixture) -> None:
    code = main(["resources", str(TINY), "--gpu-memory-gb", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("dplora-ray: error: --gpu-memory")


def test_resources_check_runs_on_tiny_llama(tmp_path: Path) -> None:
    # Execute: the benchmark's plumbing (fresh processes, RSS sampling, the estimate) on
    # the tiny model, whose RSS is mostly the runtime overhead
    out = tmp_path / "check.json"
    subprocess.run([sys.executable, "-m", "benchmarks.resources_check", "--config",
                    str(TINY), "--steps", "1", "--batch", "4", "--max-length", "32",
                    "--variants", "float32,bfloat16+ckpt", "--allocators", "mmap",
                    "--json", str(out)], cwd=ROOT, check=True, capture_output=True, text=True)
    runs = json.loads(out.read_text())["runs"]

    # Assert
    assert [(r["variant"], r["allocator"], r["status"]) for r in runs] == [
        ("float32", "mmap", "ok"), ("bfloat16+ckpt", "mmap", "ok")]
    for r in runs:
        assert r["rss_after_imports_gib"] < r["peak_rss_gib"]
        assert abs(r["ratio"] - 1) <= 0.25, r


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_estimate_is_within_25_percent_of_measured_rss_on_smollm2(tmp_path: Path) -> None:
    # Execute: fresh processes (clean RSS), SmolLM2, the demo recipe, 2 DP-SGD steps at
    # 8 x 64 tokens, float32 and bfloat16 base, with and without checkpointing; glibc
    # returning freed blocks at once (the estimate counts live tensors: see
    # benchmarks/resources_check.py for what the default allocator keeps on top)
    out = tmp_path / "check.json"
    subprocess.run([sys.executable, "-m", "benchmarks.resources_check", "--steps", "2",
                    "--batch", "8", "--max-length", "64", "--allocators", "mmap",
                    "--json", str(out)], cwd=ROOT, check=True, capture_output=True, text=True)
    result = json.loads(out.read_text())

    # Assert
    print(json.dumps(result["runs"], indent=1))
    assert len(result["runs"]) == 4
    for run in result["runs"]:
        assert run["status"] == "ok"
        assert abs(run["ratio"] - 1) <= 0.25, run
