"""What the audit plants in the clients' data, before anything is trained or accounted.

Three populations, all drawn from one seeded stream (``SeedSequence(seed, (AUDIT_STREAM,))``):

* **Secret canaries** (Carlini et al. 2019, "The Secret Sharer", Sec. 3): ``audit.canaries``
  prompts ``"my account number is <s>"`` with ``s`` a uniformly random string of
  ``audit.secret_digits`` digits, each paired with a uniformly random task label ``y``
  and inserted ``audit.repeats`` times into one of the ``audit.canary_clients`` most often
  sampled clients. The model is trained to classify, never to generate, so the secret is
  the *pairing* of ``s`` with ``y``: memorising it means scoring ``y`` higher after ``s``
  than after other digit strings. ``audit.candidates`` other strings of the same space
  are drawn to rank ``s`` against (:mod:`dplora_ray.audit.metrics`).
* **Membership canaries** (the population of the epsilon bound): ``audit.mia_canaries``
  more prompts of the same form, each with a uniformly random label, inserted ONCE each
  into a uniformly random sampled client. Their non-members are the candidates, each
  also given a uniformly random label: members and non-members are i.i.d. draws of the
  same (string, label) distribution, and which ones went in is decided by the seed
  alone, so they are exchangeable before training (the in/out game of Jagielski et al.
  2020 and Nasr et al. 2021, played once per canary). Non-members cost no training, so
  there are many of them: the false-positive rate is measured tightly.
  ``REFERENCE_CANARIES`` further never-inserted strings are only used to place the
  attack's thresholds (:mod:`dplora_ray.audit.bounds`).
* **Natural examples**: ``2 * audit.mia_examples`` training-pool examples of the sampled
  clients, drawn at random; the first half stay in training (members), the second half
  are removed from their clients (non-members: the same distribution, never trained
  on). The test split is not used as non-members (it is balanced over labels, the pool
  is not); up to ``REFERENCE_TEST_EXAMPLES`` of its examples only place the thresholds.

Invariants:
    * Deterministic given the config and the seed; draws from no global RNG.
    * Runs before the privacy plan: the accountant sees the clients' data as trained
      (canaries included, held-out examples excluded).
    * Every client keeps at least one example; bad sizes raise
      :class:`~dplora_ray.errors.ConfigError` naming the ``audit.*`` key.
    * Imports neither Ray nor peft.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dplora_ray.config import ExperimentConfig
from dplora_ray.errors import ConfigError
from dplora_ray.federated.encoding import EncodedData, EncodedSplit, encode_split

__all__ = [
    "AUDIT_STREAM",
    "AuditPlan",
    "REFERENCE_CANARIES",
    "REFERENCE_TEST_EXAMPLES",
    "SECRET_TEMPLATE",
    "SECTIONS",
    "concat_splits",
    "insert_canaries",
    "subset_split",
]

AUDIT_STREAM = 0xA0D17  # spawn key of the audit's random stream (apart from the run's)
SECRET_TEMPLATE = "my account number is {secret}"
DIGITS = "0123456789"
REFERENCE_CANARIES = 256  # never-inserted canaries that place the attack's thresholds
REFERENCE_TEST_EXAMPLES = 512  # test examples that do the same for natural examples
SECTIONS = ("secrets", "candidates", "canaries", "reference_canaries", "natural",
            "reference_natural")


@dataclass(frozen=True, eq=False)
class AuditPlan:
    """The planted populations and every sequence the audit will score.

    ``queries`` holds the sections of :data:`SECTIONS` in that order: the secrets
    (``K``), the candidates (``M``; the membership non-members), the membership canaries
    (``mia_canaries``, all members), the reference canaries, the natural audit examples
    (``2 * mia_examples``, members first) and the natural reference (test) examples; its
    labels are the label each sequence was (or would have been) trained with. For
    exposure a candidate is scored for each secret's label instead.
    """

    seed: int
    queries: EncodedSplit
    num_labels: int
    secret_digits: int
    repeats: int
    secrets: tuple[str, ...]
    secret_labels: np.ndarray  # [K]
    secret_clients: np.ndarray  # [K]
    num_candidates: int
    canary_clients: np.ndarray  # client each membership canary was inserted into
    sampled_clients: tuple[int, ...]  # clients sampled in some round
    natural_member: np.ndarray  # bool [2 mia_examples]
    natural_clients: np.ndarray  # client each natural audit example belongs to
    natural_index: np.ndarray  # their index in the training split
    num_reference_canaries: int
    num_reference_natural: int
    train_size_before: int  # training-split size before the canaries were appended

    @property
    def num_secrets(self) -> int:
        return len(self.secrets)

    def section(self, name: str) -> np.ndarray:
        """Indices into ``queries`` of one of :data:`SECTIONS`."""
        sizes = dict(zip(SECTIONS, (self.num_secrets, self.num_candidates,
                                    len(self.canary_clients), self.num_reference_canaries,
                                    len(self.natural_member), self.num_reference_natural)))
        start = 0
        for key, size in sizes.items():
            if key == name:
                return np.arange(start, start + size)
            start += size
        raise KeyError(name)

    @property
    def audited_clients(self) -> tuple[int, ...]:
        """Clients an audited example is (or would have been) in: any sampled client for
        the membership canaries (a non-member would have gone to a random one), and the
        natural examples' own clients."""
        return tuple(sorted(set(self.sampled_clients) if len(self.canary_clients)
                            else {int(c) for c in self.natural_clients}))


def subset_split(split: EncodedSplit, index: np.ndarray) -> EncodedSplit:
    """The examples ``index`` of ``split``, as a split of their own (in that order)."""
    index = np.asarray(index, dtype=np.int64)
    lens = split.offsets[index + 1] - split.offsets[index]
    offsets = np.zeros(len(index) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    ids = (np.concatenate([split.ids[split.offsets[i]:split.offsets[i + 1]] for i in index])
           if len(index) else np.zeros(0, dtype=split.ids.dtype))
    return EncodedSplit(ids=ids.astype(split.ids.dtype), offsets=offsets,
                        labels=split.labels[index].astype(np.int64))


def concat_splits(splits: Sequence[EncodedSplit]) -> EncodedSplit:
    """The splits one after the other."""
    ids = np.concatenate([s.ids for s in splits]).astype(np.int32)
    lens = np.concatenate([s.lengths() for s in splits])
    offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    labels = np.concatenate([s.labels for s in splits]).astype(np.int64)
    return EncodedSplit(ids=ids, offsets=offsets, labels=labels)


def _random_strings(rng: np.random.Generator, n: int, length: int, taken: set[str],
                    alphabet: str = DIGITS) -> list[str]:
    """``n`` distinct uniformly random strings over ``alphabet`` not in ``taken`` (added
    to it)."""
    out: list[str] = []
    while len(out) < n:
        draw = rng.integers(0, len(alphabet), size=(2 * (n - len(out)) + 8, length))
        for row in draw:
            s = "".join(alphabet[int(d)] for d in row)
            if s not in taken:
                taken.add(s)
                out.append(s)
                if len(out) == n:
                    break
    return out


def _participation(cfg: ExperimentConfig, cohorts: Sequence[np.ndarray]) -> np.ndarray:
    counts = np.zeros(cfg.federation.num_clients, dtype=np.int64)
    for cohort in cohorts:
        counts[np.asarray(cohort, dtype=np.int64)] += 1
    return counts


def _encode(cfg: ExperimentConfig, model_source: str, texts: list[str],
            labels: np.ndarray) -> EncodedSplit:
    from transformers import AutoTokenizer

    from dplora_ray.data import get_task

    tok = AutoTokenizer.from_pretrained(model_source, revision=cfg.model.revision)
    template = get_task(cfg.data.task).prompt_template
    split = encode_split(tok, template, texts, labels, cfg.model.max_length)
    full = encode_split(tok, template, texts, labels, 1 << 20)
    if len(split) and not np.array_equal(split.lengths(), full.lengths()):
        raise ConfigError("model.max_length", cfg.model.max_length,
                          "is too short for the audit canaries (their secret would be "
                          f"truncated; they need {int(full.lengths().max())} tokens)")
    return split


def insert_canaries(cfg: ExperimentConfig, data: EncodedData, parts: Sequence[np.ndarray],
                    cohorts: Sequence[np.ndarray], model_source: str
                    ) -> tuple[EncodedData, list[np.ndarray], AuditPlan]:
    """Plant the audit's populations (see the module doc).

    Args:
        cfg: the experiment (``cfg.audit`` says what to plant).
        data: the encoded splits; not modified.
        parts: each client's indices into ``data.train``; not modified.
        cohorts: the sampled client ids of every round (canaries go to sampled clients).
        model_source: where the tokenizer is (``RunPlan.model_source``).

    Returns:
        The training split with the canaries appended, the clients' new index arrays
        (canaries added, held-out natural examples removed), and the :class:`AuditPlan`.

    Raises:
        ConfigError: no client is ever sampled, too few sampled clients for
            ``audit.canary_clients``, a candidate space too small for the strings to
            draw, too few examples for ``audit.mia_examples``, or ``model.max_length``
            too short for the canaries.
    """
    a = cfg.audit
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(AUDIT_STREAM,)))
    counts = _participation(cfg, cohorts)
    sampled = np.flatnonzero(counts)
    if len(sampled) == 0:
        raise ConfigError("audit.enabled", True, "no client is sampled in any round, so "
                          "nothing the audit plants would be trained on")
    if a.canaries and a.canary_clients > len(sampled):
        raise ConfigError("audit.canary_clients", a.canary_clients,
                          f"more than the {len(sampled)} clients sampled in some round")
    n_strings = a.canaries + a.candidates + a.mia_canaries + REFERENCE_CANARIES
    if n_strings > 10 ** a.secret_digits // 2:
        raise ConfigError("audit.secret_digits", a.secret_digits,
                          f"10^{a.secret_digits} strings are too few to draw {n_strings} "
                          "distinct secrets, candidates and canaries from (keep it below half)")
    K, L = a.canaries, data.num_labels

    # secret canaries: to the most often sampled clients (ties in random order)
    tiebreak = rng.permutation(len(sampled))
    by_use = sampled[np.lexsort((tiebreak, -counts[sampled]))]
    holders = by_use[: a.canary_clients]
    taken: set[str] = set()
    secrets = _random_strings(rng, K, a.secret_digits, taken)
    secret_labels = rng.integers(0, L, size=K).astype(np.int64)
    secret_clients = holders[np.arange(K) % len(holders)].astype(np.int64)

    # membership canaries (in once each) and candidates (never in), random labels
    m_c = a.mia_canaries
    canary_texts = _random_strings(rng, m_c, a.secret_digits, taken)
    canary_labels = rng.integers(0, L, size=m_c).astype(np.int64)
    canary_clients = rng.choice(sampled, size=m_c).astype(np.int64)
    candidates = _random_strings(rng, a.candidates, a.secret_digits, taken)
    candidate_labels = rng.integers(0, L, size=len(candidates)).astype(np.int64)
    n_ref = REFERENCE_CANARIES if m_c else 0
    references = _random_strings(rng, n_ref, a.secret_digits, taken)
    reference_labels = rng.integers(0, L, size=n_ref).astype(np.int64)

    # natural examples of the sampled clients: half stay (members), half are held out
    m_n = a.mia_examples
    pool = np.concatenate([np.asarray(parts[int(c)], dtype=np.int64) for c in sampled])
    pool_client = np.concatenate([np.full(len(parts[int(c)]), c, dtype=np.int64)
                                  for c in sampled])
    if 2 * m_n > len(pool) - len(sampled):
        raise ConfigError("audit.mia_examples", m_n,
                          f"needs {2 * m_n} examples of the sampled clients (half held out), "
                          f"but they hold {len(pool)}")
    pick = rng.choice(len(pool), size=2 * m_n, replace=False)
    natural_member = np.zeros(2 * m_n, dtype=bool)
    natural_member[:m_n] = True
    natural_index, natural_clients = pool[pick], pool_client[pick]

    # the new training split: old examples, then the secret copies, then member canaries
    def prompt(s: str) -> str:
        return SECRET_TEMPLATE.format(secret=s)

    texts = [prompt(s) for s in [*secrets, *candidates, *canary_texts, *references]]
    labels = np.concatenate([secret_labels, candidate_labels, canary_labels,
                             reference_labels])
    encoded = _encode(cfg, model_source, texts, labels)
    n0 = len(data.train)
    sec_idx = np.arange(K)
    can_idx = K + len(candidates) + np.arange(m_c)
    copies = np.repeat(sec_idx, a.repeats)
    train = concat_splits([data.train, subset_split(encoded, np.concatenate([copies, can_idx]))])
    new_rows_client = np.concatenate([np.repeat(secret_clients, a.repeats), canary_clients])
    new_parts = []
    for c, part in enumerate(parts):
        part = np.asarray(part, dtype=np.int64)
        kept = part[~np.isin(part, natural_index[~natural_member])]
        added = n0 + np.flatnonzero(new_rows_client == c)
        merged = np.sort(np.concatenate([kept, added]))
        if len(merged) == 0:
            raise ConfigError("audit.mia_examples", m_n,
                              f"holding examples out leaves client {c} with no data")
        new_parts.append(merged)

    test_ref = (np.sort(rng.choice(len(data.test), min(len(data.test), REFERENCE_TEST_EXAMPLES),
                                   replace=False)) if m_n else np.zeros(0, dtype=np.int64))
    queries = concat_splits([encoded, subset_split(data.train, natural_index),
                             subset_split(data.test, test_ref)])
    plan = AuditPlan(
        seed=cfg.seed, queries=queries, num_labels=L, secret_digits=a.secret_digits,
        repeats=a.repeats, secrets=tuple(secrets), secret_labels=secret_labels,
        secret_clients=secret_clients, num_candidates=len(candidates),
        canary_clients=canary_clients, sampled_clients=tuple(int(c) for c in sampled),
        natural_member=natural_member, natural_clients=natural_clients,
        natural_index=natural_index, num_reference_canaries=n_ref,
        num_reference_natural=len(test_ref), train_size_before=n0)
    return dataclasses.replace(data, train=train), new_parts, plan
