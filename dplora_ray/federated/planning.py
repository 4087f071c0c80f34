"""Planning a run: everything that can fail on bad input, done before any output exists.

:func:`plan_run` loads and splits the data, tokenises it (:func:`encode_experiment`),
partitions it over the clients, draws the cohorts of every round up front from the
public seed (:func:`sample_cohorts`), plants the audit's canaries when asked, and plans
the privacy (:func:`~dplora_ray.privacy.mechanisms.plan_privacy`). The result is a
:class:`RunPlan`; the runner only runs it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from dplora_ray.config import ExperimentConfig
from dplora_ray.errors import ConfigError, DataError, OutputError
from dplora_ray.federated.encoding import (
    EncodedData,
    encode_choices,
    encode_generation,
    encode_split,
    label_token_ids,
)
from dplora_ray.outputs import RUN_OUTPUTS, check_overwrite, check_writable, entries
from dplora_ray.privacy.mechanisms import get_mechanism
from dplora_ray.privacy.plan import PrivacyPlan, plan_privacy
from dplora_ray.privacy.streams import PublicStream, public_rng, public_seed

__all__ = [
    "RunPlan",
    "check_output",
    "cohort_mode",
    "data_fingerprint",
    "derive_seed",
    "encode_experiment",
    "plan_run",
    "sample_cohorts",
]


def derive_seed(seed: int, stream: int, *position: int) -> int:
    """A 63-bit PUBLIC seed that depends only on (run seed, stream, position)."""
    return public_seed(seed, PublicStream(stream), *position)


def cohort_mode(cfg: ExperimentConfig) -> str:
    sampling = cfg.federation.cohort_sampling
    if sampling == "auto":
        return get_mechanism(cfg.privacy.mode).cohort_sampling
    return sampling


def sample_cohorts(cfg: ExperimentConfig) -> list[np.ndarray]:
    """Sorted client ids sampled for each round 1..rounds (deterministic from the seed)."""
    fed = cfg.federation
    out = []
    for r in range(1, fed.rounds + 1):
        rng = public_rng(cfg.seed, PublicStream.COHORTS, r)
        if cohort_mode(cfg) == "poisson":
            q = fed.clients_per_round / fed.num_clients
            ids = np.flatnonzero(rng.random(fed.num_clients) < q)
        else:
            ids = np.sort(rng.choice(fed.num_clients, size=fed.clients_per_round, replace=False))
        out.append(ids.astype(np.int64))
    return out


@dataclass
class RunPlan:
    cfg: ExperimentConfig
    data: EncodedData
    parts: list[np.ndarray]
    cohorts: list[np.ndarray]
    privacy: PrivacyPlan
    model_source: str
    label_names: tuple[str, ...]
    audit: Any = None  # issue 8: the AuditPlan (dplora_ray.audit) when audit.enabled
    tokenizer: Any = None  # the driver decodes generated answers (generation tasks)
    references: list[str] | None = None  # generation: reference answers for ROUGE-L

    @cached_property
    def fingerprint(self) -> dict[str, str]:
        """:func:`data_fingerprint` of this plan's data and partition."""
        return data_fingerprint(self.data, self.parts)

    def client_rate(self, cid: int) -> float:
        return min(1.0, self.cfg.federation.batch_size / len(self.parts[cid]))

    def ledger_entries(self, server_round: int, cohort: np.ndarray) -> list[Any]:
        """What one round charges (every sampled client, whether or not it completes)."""
        p = self.privacy
        return p.mechanism.ledger_entries(server_round, cohort, p.effective_noise_multiplier,
                                          self.cfg, self.parts)


def check_output(out_dir: Path, overwrite: bool) -> None:
    """``out_dir`` can take a new run: missing or empty, or (``overwrite``) holding only
    what a run writes (:data:`~dplora_ray.outputs.RUN_OUTPUTS`); and it can be created
    and written. Checked before any model or data is loaded; leaves nothing behind."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError("--out", str(out_dir), "exists and is not a folder")
    if out_dir.is_dir() and entries(out_dir):
        if not overwrite:
            raise OutputError("--out", str(out_dir),
                              "exists and is not empty; pass --overwrite or pick a new folder")
        check_overwrite(out_dir, RUN_OUTPUTS)
    check_writable(out_dir, "--out")


def data_fingerprint(data: EncodedData, parts: list[np.ndarray]) -> dict[str, str]:
    """Content hashes (BLAKE2b, hex) of the encoded training data (``train``: token ids,
    offsets, labels, prompt lengths, label tokens), the test split (``test``) and the
    client partition (``partition``); stored in the checkpoint, checked on resume."""
    def digest(*arrays: Any) -> str:
        h = hashlib.blake2b(digest_size=16)
        for a in arrays:
            b = b"-" if a is None else np.ascontiguousarray(a, dtype="<i8").tobytes()
            h.update(len(b).to_bytes(8, "little") + b)
        return h.hexdigest()

    def split(s: Any) -> tuple[Any, ...]:
        return (s.ids, s.offsets, s.labels, s.prompt_lens, [s.choices])

    eos = -1 if data.eos_id is None else data.eos_id
    return {"train": digest(*split(data.train), list(data.label_token_ids),
                            [data.pad_id, eos, data.num_labels]),
            "test": digest(*split(data.test)),
            "partition": digest([len(parts)], *parts)}


def encode_experiment(cfg: ExperimentConfig) -> tuple[EncodedData, Any, str, Any]:
    from transformers import AutoTokenizer

    from dplora_ray.data import load_data
    from dplora_ray.errors import ModelError
    from dplora_ray.fileio import one_line
    from dplora_ray.model_checks import check_model_fits
    from dplora_ray.models import prepare_model

    loaded = load_data(cfg.data, cfg.seed)
    source = prepare_model(cfg.model)
    # what a worker would fail on, checked here: context length, LoRA target modules
    check_model_fits(source, cfg.model, cfg.lora if cfg.federation.strategy == "lora" else None)
    try:
        tok = AutoTokenizer.from_pretrained(source, revision=cfg.model.revision)
    except Exception as exc:  # noqa: BLE001 - missing, unreadable or malformed files
        raise ModelError("model.name", cfg.model.name,
                         f"tokenizer could not be loaded ({one_line(exc, 200)})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    task: Any = loaded.task  # Task, MultipleChoiceTask or GenerationTask (by .kind)
    ml = cfg.model.max_length
    common = {"pad_id": int(tok.pad_token_id), "num_labels": task.num_labels,
              "task_type": task.kind, "eos_id": tok.eos_token_id}
    if task.kind == "classification":
        label_ids = label_token_ids(tok, task.label_words)
        train = encode_split(tok, task.prompt_template, loaded.train["text"].tolist(),
                             loaded.train["label"].to_numpy(), ml)
        test = encode_split(tok, task.prompt_template, loaded.test["text"].tolist(),
                            loaded.test["label"].to_numpy(), ml)
    elif task.kind == "multiple_choice":
        label_ids = ()
        train, test = (encode_choices(tok, task.prompt_template, f["text"].tolist(),
                                      f["choices"].tolist(), f["label"].to_numpy(),
                                      task.num_choices, ml, task.choice_prefix)
                       for f in (loaded.train, loaded.test))
    else:
        label_ids = ()
        train, test = (encode_generation(tok, task.prompt_template, f["text"].tolist(),
                                         f["target"].tolist(), ml, task.answer_prefix)
                       for f in (loaded.train, loaded.test))
    data = EncodedData(train=train, test=test, label_token_ids=label_ids, **common)
    return data, loaded, source, tok


def plan_run(cfg: ExperimentConfig) -> RunPlan:
    """Everything that can fail on bad input, done before any output is written."""
    from dplora_ray.data import partition_indices

    data, loaded, source, tok = encode_experiment(cfg)
    fed = cfg.federation
    blackbox = cfg.audit.enabled and cfg.audit.mode == "blackbox"  # issue 17: others plant nothing
    if blackbox and data.task_type != "classification":
        raise ConfigError("audit.enabled", True,
                          f"the privacy audit scores label words; data.task={cfg.data.task!r} "
                          f"is a {data.task_type} task")
    groups = loaded.train["group"].to_numpy() if "group" in loaded.train else None
    if fed.num_clients > len(data.train):
        raise DataError("federation.num_clients", fed.num_clients,
                        f"more clients than training examples ({len(data.train)})")
    parts = partition_indices(data.train.labels, groups, fed.num_clients, fed.partition,
                              alpha=fed.dirichlet_alpha, seed=cfg.seed)
    cohorts = sample_cohorts(cfg)
    audit = None
    if blackbox:  # issue 8: canaries change the clients' data, so plant them first
        from dplora_ray.audit import insert_canaries

        data, parts, audit = insert_canaries(cfg, data, parts, cohorts, source)
    privacy = plan_privacy(cfg, parts, cohorts)
    references = None
    if data.task_type == "generation":  # ROUGE-L references: the answers' first tokens
        references = [tok.decode(_strip_eos(data.test.target_ids(i), data.eos_id)
                                 [:cfg.data.max_new_tokens], skip_special_tokens=True)
                      for i in range(len(data.test))]
    return RunPlan(cfg, data, parts, cohorts, privacy, source, loaded.task.label_names, audit,
                   tokenizer=tok, references=references)


def _strip_eos(ids: np.ndarray, eos: int | None) -> np.ndarray:
    return ids[ids != eos] if eos is not None else ids
