"""The experiment runner (driver side).

Order of work, so that bad input never leaves a half-written folder:

1. validate: output folder (or the run to resume), data (load, split, partition), model
   (prepare, tokenizer), privacy plan (cohort schedule, noise calibration, delta vs data
   size);
2. start the backend (workers load the base model once), preflight (every mode),
   evaluate the untrained adapter; only then create the output folder;
3. per round: budget guard -> dispatch the cohort (one call per client, dealt over the
   workers) -> charge the ledger -> gather (failures and late clients handled by
   ``runtime.on_client_failure`` / ``runtime.round_timeout_s``) -> aggregate (on the
   aggregator) -> evaluate -> checkpoint -> write ``rounds.parquet`` /
   ``clients.parquet`` / ``ledger.json`` (each atomically);
4. write the adapter, ``summary.json``.

An exception after the folder exists (a worker failure under ``on_client_failure:
fail``, an interrupt, a bug) still writes ``summary.json``, with ``stop_reason: "error:
..."``, so a folder never looks complete when it is not.

Randomness (:mod:`dplora_ray.privacy.streams`). Two kinds, neither depending on timing,
worker count or process. Public, from the run seed: the cohorts of all rounds are drawn
up front (:func:`sample_cohorts`, ``PublicStream.COHORTS``); a client's batches and
dropout come from ``PublicStream.CLIENT`` at (round, client); the data split, partition
and LoRA init from the seed. Secret: every noise draw comes from the run's noise key
(drawn from the operating system when the run starts, or derived from
``privacy.noise_seed`` for research), expanded into named streams at (round, client,
step); workers get only the derived key of their own stream, round and client, the
aggregator only the server stream's. The key is kept in ``checkpoint.pt`` and nowhere
else. So the whole RNG state of a run after round ``k`` is (key, ``k``): a checkpoint
stores both (and the cohort history, to check on resume that the schedule drawn again is
the same). A fresh run writes a round-0 checkpoint before dispatching anything, so a run
killed in its first round resumes with the same key.

Checkpoint and resume. After every round ``checkpoint.pt`` holds all a run needs to go
on exactly: the global LoRA state and the server optimizer's state (the aggregator's
:meth:`~Aggregator.checkpoint`), the privacy ledger, the RNG position, the cohort
history, the result rows so far and the evaluation before training. It is written to a
temporary file, flushed to disk and renamed over the old one, so a crash while writing
leaves the previous checkpoint intact; the result files are written after it. ``resume``
restores it and re-runs from the next round; that round's clients were charged in the
killed run's memory only (the checkpoint holds the ledger of finished rounds), and they
are charged again when the round is re-run. Re-running a round releases nothing new:
the same seeds and the same noise key give the same updates, so what any party could
have seen from the killed attempt is exactly what the re-run produces.

Determinism. Client results are gathered in whatever order they finish but are
aggregated and recorded in client-id order; evaluation batches are fixed chunks of one
global length-sorted order of the test set, dealt round-robin to the workers, so the
same config and seed give identical ``rounds.parquet``, ``clients.parquet`` (timing
columns and ``worker`` aside) and adapter whatever ``runtime.num_workers``.

Failures. A worker that dies is restarted by Ray (``runtime.max_worker_restarts``); the
client work it lost is handled by ``runtime.on_client_failure``:

* ``retry``: re-run on the next worker (round-robin) with the same job, hence the same
  RNG stream and the same result (status ``failed_retried``); at most
  ``max(1, max_worker_restarts)`` times per client and round, then the run fails;
* ``drop``: the round is aggregated without it (status ``dropped_failure``);
* ``fail``: the run ends with :class:`~dplora_ray.errors.RunFailedError` (status
  ``failed`` for the lost client, ``aborted`` for the rest of that round); the finished
  rounds, the ledger (the failed round's charges included) and an error summary are
  written, and the run can be resumed.

With ``runtime.round_timeout_s`` a round's clients whose result is not back within that
many seconds of dispatch are dropped (status ``dropped_timeout``), and the workers still
busy with them are restarted so the next round starts clean.

Privacy under failures. Every sampled client is charged in the ledger when the round is
dispatched, before anything is gathered, whether it then completes, is retried, dropped
or late. In example-level modes (``dpsgd``, ``paper``) and ``local`` each client's
release is its own noised update, so a dropped client released nothing (or, if it was
lost after sending, the one release it was charged for). In ``client`` mode (DP-FedAvg)
the rule is: *the noise, the denominator and the ledger are those of the planned
mechanism, whatever the realised cohort*. The server releases ``(sum_{i in S'} clip(u_i,
C) + N(0, sigma^2 C^2)) / (q N)`` where ``S`` is the Poisson-sampled cohort and ``S' <= S``
the clients whose update arrived; the noise is calibrated to C and the divisor is the
EXPECTED cohort size ``qN``, neither depends on ``|S'|``. Adding or removing one client's
data changes the sum by at most C if that client is in ``S'`` and by 0 otherwise:
dropping clients can only reduce the sum's dependence on any one client, never raise it,
so the sampled Gaussian mechanism accounted with ``q = K/N`` and noise multiplier sigma
still bounds the release, and the ledger entry of the round stands as charged. This
assumes a drop is not caused by another client's data (worker crashes, infrastructure,
a client's own slowness); a timing side channel through a shared worker queue is outside
the model, as it is in McMahan et al. (2018). The cost of drops is utility (the update
is shrunk by ``|S'| / (qN)``), visible in ``num_clients_completed``.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dplora_ray import results as R
from dplora_ray.config import ExperimentConfig, config_from_dict, config_to_dict, save_config
from dplora_ray.errors import ConfigError, DataError, OutputError, PrivacyError, RunFailedError
from dplora_ray.federated.client import (
    STATUS_NONFINITE,
    STATUS_OK,
    STATUS_SKIPPED_IRRELEVANT,
    ClientJob,
    tensor_bytes,
)
from dplora_ray.federated.encoding import (
    EncodedData,
    encode_choices,
    encode_generation,
    encode_split,
    label_token_ids,
)
from dplora_ray.privacy.mechanisms import (
    ALL_CLIENTS,
    PrivacyPlan,
    client_unit,
    get_mechanism,
    plan_privacy,
)
from dplora_ray.privacy.streams import NoiseKey, PublicStream, public_rng, public_seed

__all__ = [
    "ACCEPTED_STATUSES",
    "CHECKPOINT_FILE",
    "CLIENT_STATUSES",
    "PrivacyPlan",
    "RunPlan",
    "load_checkpoint",
    "plan_run",
    "run_experiment",
]

UNIT_ALL_CLIENTS = ALL_CLIENTS

#: statuses of a client-round in ``clients.parquet``
STATUS_FAILED_RETRIED = "failed_retried"  # its worker died; re-run, same RNG, aggregated
STATUS_DROPPED_FAILURE = "dropped_failure"  # its worker died; aggregated without it
STATUS_DROPPED_TIMEOUT = "dropped_timeout"  # not back within runtime.round_timeout_s
STATUS_FAILED = "failed"  # its worker died under on_client_failure=fail: the run ended
STATUS_ABORTED = "aborted"  # in the round that ended the run; not aggregated
CLIENT_STATUSES = (STATUS_OK, STATUS_FAILED_RETRIED, STATUS_NONFINITE, STATUS_DROPPED_FAILURE,
                   STATUS_DROPPED_TIMEOUT, STATUS_FAILED, STATUS_ABORTED,
                   STATUS_SKIPPED_IRRELEVANT)
#: statuses whose update was aggregated
ACCEPTED_STATUSES = (STATUS_OK, STATUS_FAILED_RETRIED)

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = "dplora_ray.checkpoint/v2"  # v2: the secret noise key
#: runtime keys a resumed run may change: where and how clients run, never what they
#: compute (docs/privacy.md); every other key, runtime.bf16_autocast,
#: runtime.gpus_per_worker and the torch thread count included, must stay as it was
RESUMABLE_RUNTIME_KEYS = ("runtime.backend", "runtime.num_workers", "runtime.address",
                          "runtime.cpus_per_worker", "runtime.on_client_failure",
                          "runtime.round_timeout_s", "runtime.max_worker_restarts",
                          "runtime.kill_worker_at_round")
EVAL_BATCH_SIZE = 32
STOP_COMPLETED = "completed"
STOP_BUDGET = "privacy_budget"


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

    def client_rate(self, cid: int) -> float:
        return min(1.0, self.cfg.federation.batch_size / len(self.parts[cid]))

    def ledger_entries(self, server_round: int, cohort: np.ndarray) -> list[Any]:
        """What one round charges (every sampled client, whether or not it completes)."""
        p = self.privacy
        return p.mechanism.ledger_entries(server_round, cohort, p.effective_noise_multiplier,
                                          self.cfg, self.parts)


def _check_output(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError("--out", str(out_dir), "exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise OutputError("--out", str(out_dir),
                          "exists and is not empty; pass --overwrite or pick a new folder")


def _encode(cfg: ExperimentConfig) -> tuple[EncodedData, Any, str, Any]:
    from transformers import AutoTokenizer

    from dplora_ray.data import load_data
    from dplora_ray.errors import ModelError
    from dplora_ray.models import prepare_model

    loaded = load_data(cfg.data, cfg.seed)
    source = prepare_model(cfg.model)
    try:
        tok = AutoTokenizer.from_pretrained(source, revision=cfg.model.revision)
    except OSError as exc:
        raise ModelError("model.name", cfg.model.name,
                         f"tokenizer could not be loaded ({str(exc).splitlines()[0]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    task = loaded.task
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

    data, loaded, source, tok = _encode(cfg)
    fed = cfg.federation
    if cfg.audit.enabled and data.task_type != "classification":
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
    if cfg.audit.enabled:  # issue 8: canaries change the clients' data, so plant them first
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


# =========================================================================== progress
class _Progress:
    def __init__(self, total: int, done: int, enabled: bool,
                 say: Callable[[str], None]) -> None:
        self.bar = None
        self.say = say
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done, desc="rounds", unit="round",
                            file=sys.stderr, dynamic_ncols=True)

    def update(self, **post: Any) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: v for k, v in post.items() if v is not None}, refresh=False)
            self.bar.update(1)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            self.say(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _NoLedger:
    """Stands in for the privacy ledger when ``privacy.mode`` is ``none``."""

    def append(self, entry: Any) -> None:
        raise AssertionError("nothing is charged without privacy")

    def epsilons(self) -> dict[str, float]:
        return {}

    def save(self, path: Path) -> None:
        R.write_json_atomic({"mode": "none", "unit_of_privacy": None, "entries": [],
                             "protects": "nothing: privacy.mode is 'none'"}, path)


def _describe_eval(ev: tuple[float, ...]) -> str:
    loss, acc, f1m, f1w, ppl, rouge = ev
    if math.isnan(acc):  # generation
        return f"perplexity {ppl:.3f}, ROUGE-L {rouge:.4f}, loss {loss:.4f}"
    return (f"accuracy {acc:.4f}, macro-F1 {f1m:.4f}, weighted F1 {f1w:.4f}, "
            f"loss {loss:.4f}")


def _fmt(x: float | None, spec: str = ".3f") -> str | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _plain(obj: Any) -> Any:
    """Python scalars instead of numpy ones (checkpoints load with weights_only=True)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, RunFailedError) else text


# =========================================================================== checkpoint
def _write_checkpoint_atomic(payload: dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same folder, flush it to disk, rename it over
    ``path``: a crash at any point leaves either the old or the new checkpoint."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load_checkpoint(run_dir: str | Path) -> dict[str, Any] | None:
    """The checkpoint of a run folder (None when it has none).

    Raises:
        OutputError: the file exists but is not a readable checkpoint.
    """
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, unsafe pickle ...
        raise OutputError("--resume", str(run_dir),
                          f"{CHECKPOINT_FILE} cannot be read ({_one_line(exc)[:160]})") from None
    if isinstance(ck, dict) and ck.get("format") == "dplora_ray.checkpoint/v1":
        raise OutputError("--resume", str(run_dir),
                          f"{CHECKPOINT_FILE} was written by an older dplora_ray whose noise "
                          "was derived from the public seed; it cannot be continued "
                          "privately: start a new run")
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise OutputError("--resume", str(run_dir),
                          f"{CHECKPOINT_FILE} is not a {CHECKPOINT_FORMAT} checkpoint")
    return ck


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not prefix:
            out.update(_flat(v, f"{key}."))
        else:
            out[key] = v
    return out


def _compare_configs(saved: ExperimentConfig, given: ExperimentConfig, run_dir: Path
                     ) -> list[str]:
    """Refuse a config that would not continue the saved run exactly; return the
    :data:`RESUMABLE_RUNTIME_KEYS` that differ (where and how clients run: they never
    change what is computed). A change of ``runtime.cpus_per_worker`` that changes the
    torch thread count (``runtime.torch_threads`` unset) is refused too."""
    old, new = _flat(config_to_dict(saved)), _flat(config_to_dict(given))
    changed_runtime = []
    if saved.runtime.threads != given.runtime.threads:
        key = ("runtime.torch_threads" if old.get("runtime.torch_threads")
               != new.get("runtime.torch_threads") else "runtime.cpus_per_worker")
        raise ConfigError(key, new.get(key),
                          f"changes the torch thread count of the run being resumed in "
                          f"{str(run_dir)!r} ({saved.runtime.threads} -> "
                          f"{given.runtime.threads}), and with it the floating-point "
                          "results; resume with the same thread count or start a new run")
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        if key in RESUMABLE_RUNTIME_KEYS:
            changed_runtime.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
            continue
        why = " (it changes what is computed)" if key.startswith("runtime.") else ""
        raise ConfigError(key, new.get(key),
                          f"differs from the run being resumed in {str(run_dir)!r} "
                          f"({old.get(key)!r}){why}; resume with that run's config "
                          "(omit CONFIG) or start a new run")
    return changed_runtime


def _resume_point(cfg: ExperimentConfig, out: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """Validate ``out`` as a run to resume with ``cfg``; its checkpoint (None: start at
    round 1, in ``out`` if it holds a run that never finished a round)."""
    if out.exists() and not out.is_dir():
        raise OutputError("--resume", str(out), "exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return None, []
    ck = load_checkpoint(out)
    if ck is not None:
        try:
            saved = config_from_dict(ck["config"])
        except ConfigError as exc:
            raise OutputError("--resume", str(out),
                              f"the checkpoint's config is invalid ({exc})") from None
    elif (out / "config.yaml").is_file():
        from dplora_ray.config import load_config

        saved = load_config(out / "config.yaml")
    else:
        raise OutputError("--resume", str(out),
                          "holds no dplora-ray run (no config.yaml); nothing to resume")
    return ck, _compare_configs(saved, cfg, out)


# =========================================================================== the run
@dataclass
class _Pending:
    client_id: int
    worker: int
    attempt: int
    payload: Any


@dataclass
class _Outcome:
    status: str
    worker: int
    result: Any = None  # ClientResult without its update
    payload: Any = None  # future of the update (aggregator only)


class _Pool:
    """Which workers take work. A lost worker is left out until it answers a ping (Ray
    refuses calls while it restarts); one that Ray will not restart is left out for
    good. Work goes to the workers that are up, so the run never waits for a restart
    unless no worker is up."""

    PING_EVERY_S = 0.5
    WAIT_FOR_ANY_S = 600.0

    def __init__(self, backend: Any, note: Callable[[str], None]) -> None:
        self.backend, self.note = backend, note
        self.up = list(range(len(backend.workers)))
        self.down: dict[int, tuple[Any, float]] = {}
        self.dead: set[int] = set()

    def lost(self, w: int, permanent: bool = False) -> None:
        if w in self.up:
            self.up.remove(w)
        if permanent:
            self.down.pop(w, None)
            if w not in self.dead:
                self.dead.add(w)
                self.note(f"worker {w} is gone for good (runtime.max_worker_restarts used up)")
        elif w not in self.down and w not in self.dead:
            self.down[w] = (self.backend.submit(self.backend.workers[w], "ping"),
                            time.monotonic())

    def refresh(self) -> None:
        from dplora_ray.federated.backends import WorkerLost

        for w, (fut, asked) in list(self.down.items()):
            if not self.backend.wait([fut], 0):
                continue
            try:
                self.backend.get(fut)
            except WorkerLost as exc:
                if exc.permanent:
                    self.lost(w, permanent=True)
                elif time.monotonic() - asked >= self.PING_EVERY_S:  # still restarting
                    self.down[w] = (self.backend.submit(self.backend.workers[w], "ping"),
                                    time.monotonic())
                continue
            del self.down[w]
            self.up = sorted([*self.up, w])
            self.note(f"worker {w} is back (restarted)")

    def usable(self) -> list[int]:
        """The workers that are up (waits while none is but some may come back)."""
        self.refresh()
        deadline = time.monotonic() + self.WAIT_FOR_ANY_S
        while not self.up:
            if not self.down:
                raise RunFailedError("every client worker died and none will be restarted "
                                     "(runtime.max_worker_restarts); continue with --resume")
            if time.monotonic() > deadline:
                raise RunFailedError(f"no client worker came back within "
                                     f"{self.WAIT_FOR_ANY_S:g} s; continue with --resume")
            time.sleep(0.1)
            self.refresh()
        return list(self.up)

    def next_after(self, w: int) -> int:
        """The first usable worker after ``w`` (cyclically): retries move on."""
        ws = self.usable()
        return next((x for x in ws if x > w), ws[0])


def run_experiment(cfg: ExperimentConfig, out_dir: str | Path, *, overwrite: bool = False,
                   resume: bool = False, progress: bool = True,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run one federated experiment and write its results into ``out_dir``.

    Args:
        cfg: the experiment.
        out_dir: the run folder.
        overwrite: replace a non-empty ``out_dir`` (ignored with ``resume``).
        resume: continue the run in ``out_dir`` from its last checkpoint: every key
            outside ``runtime`` must equal the saved config's (else ConfigError); an
            empty or missing ``out_dir`` starts a new run there; a finished run returns
            its summary.
        progress: show a progress bar.
        log: where messages go (default: stderr).

    Returns the summary dict (also written as ``summary.json``).

    Raises:
        DpLoraError: bad input (before anything is written), or RunFailedError when the
            run ends early (after writing the results so far and an error summary).
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    say = log or (lambda m: print(m, file=sys.stderr))
    prior: dict[str, Any] | None = None
    if resume:
        prior, changed = _resume_point(cfg, out)
        if prior is not None and prior.get("finished") and (out / "summary.json").is_file():
            import json

            summary = json.loads((out / "summary.json").read_text())
            if not str(summary.get("stop_reason", "error")).startswith("error"):
                say(f"resume: {out} is already finished ({summary['stop_reason']})")
                return summary
        for c in changed:
            say(f"resume: {c}")
    else:
        _check_output(out, overwrite)
    plan = plan_run(cfg)
    if prior is not None:
        drawn = [[int(c) for c in cohort] for cohort in plan.cohorts[:prior["server_round"]]]
        if drawn != prior["cohorts"]:  # the schedule is a function of (config, seed)
            raise OutputError("--resume", str(out), "the checkpoint's cohort history does "
                              "not match the cohorts drawn again from its config and seed")

    from dplora_ray.federated.backends import make_backend

    say(f"starting {cfg.runtime.backend} backend "
        f"({cfg.runtime.num_workers if cfg.runtime.backend == 'actors' else 1} worker(s), "
        f"model {cfg.model.name})")
    backend = make_backend(cfg, plan.data)
    try:
        run = _Run(cfg, plan, backend, out, say, progress, t_start)
        run.start(prior, overwrite=overwrite and not resume)
        return run.execute()
    finally:
        backend.shutdown()


class _Run:
    """One experiment on a started backend (driver side)."""

    def __init__(self, cfg: ExperimentConfig, plan: RunPlan, backend: Any, out: Path,
                 say: Callable[[str], None], progress: bool, t_start: float) -> None:
        self.cfg, self.plan, self.backend, self.out = cfg, plan, backend, out
        self.say, self.progress, self.t_start = say, progress, t_start
        self.fed, self.pc, self.pp = cfg.federation, cfg.privacy, plan.privacy
        self.rt = cfg.runtime
        self.rounds_rows: list[dict[str, Any]] = []
        self.client_rows: list[dict[str, Any]] = []
        self.stop_reason = STOP_COMPLETED
        self.done_rounds = 0
        self.finished = False
        self.wall_before = 0.0
        self.resumed_from: int | None = None
        self.folder_ready = False
        self.bar: _Progress | None = None
        self.last_update_ref: Any = None  # CMFL's reference, this round's

    # ------------------------------------------------------------------ set-up
    def start(self, prior: dict[str, Any] | None, overwrite: bool) -> None:
        cfg, pc, pp, backend = self.cfg, self.pc, self.pp, self.backend
        self.pool = _Pool(backend, self._note)
        w0 = backend.workers[0]
        self.init_full = backend.get(backend.submit(w0, "initial_state"))
        trainable_keys = backend.get(backend.submit(w0, "trainable_keys"))
        self.initial = {k: self.init_full[k] for k in trainable_keys}
        mech = pp.mechanism
        if mech.local_training == "paper":  # every trainable tensor in the A or B group
            mech.paper_groups(trainable_keys)
        if pc.preflight:  # in every mode: a LoRA tensor off the classifier path never trains
            info = backend.get(backend.submit(w0, "preflight"))
            kind = "tensors" if self.fed.strategy == "full" else "LoRA tensors"
            self.say(f"preflight passed ({info['checked_tensors']} {kind} "
                     f"{mech.preflight_words})")
        self.noise_key = self._noise_key(prior)
        self.aggregator = backend.make_aggregator(
            initial=self.initial, mode=pp.mode, server_learning_rate=self.fed.server_learning_rate,
            clipping_norm=pc.clipping_norm,
            noise_key=(self.noise_key.derive(mech.noise_stream)
                       if self.noise_key is not None and mech.noise_by == "server" else None),
            keep_last_update=self.fed.compression == "cmfl")
        from dplora_ray.federated.client import TRANSFER_DTYPES

        tdtype = TRANSFER_DTYPES[self.fed.transfer_dtype]
        self.down_bytes = tensor_bytes({k: v.to(tdtype) for k, v in self.initial.items()})
        order = np.argsort(self.plan.data.test.lengths(), kind="stable")
        self.eval_chunks = [order[s:s + EVAL_BATCH_SIZE]
                            for s in range(0, len(order), EVAL_BATCH_SIZE)]
        if pp.private:
            from dplora_ray.privacy import PrivacyLedger

            self.ledger: Any = PrivacyLedger(mode=pc.mode, accountant=pc.accountant,
                                             delta=pc.delta, unit_of_privacy=pp.unit)
        else:
            self.ledger = _NoLedger()

        if prior is None:
            self.before = self.evaluate(backend.put(self.initial))
            self.last_eval = self.before
            self.say(f"eval before training: {_describe_eval(self.before)} "
                     f"({len(self.plan.data.test)} held-out examples)")
        else:
            self.restore(prior)

        # ---- everything validated: from here on we write into `out`
        out = self.out
        if prior is None:
            if out.exists() and overwrite:
                shutil.rmtree(out)
            out.mkdir(parents=True, exist_ok=True)
            for stale in ("summary.json", CHECKPOINT_FILE):  # an earlier attempt's
                (out / stale).unlink(missing_ok=True)
        else:
            (out / "summary.json").unlink(missing_ok=True)  # not finished any more
        save_config(cfg, out / "config.yaml")
        self.folder_ready = True
        if prior is not None:  # the result files as of the checkpoint
            self.write_results()
        else:  # round 0: the noise key is on disk before anything is released
            self.checkpoint()
        if self.noise_key is not None and self.noise_key.reproducible:
            self.say(f"warning: privacy.noise_seed={pc.noise_seed} makes the noise "
                     "reproducible: this run is NOT private against anyone who knows it "
                     "(research and tests only; docs/privacy.md)")
        if pp.private:
            unit_text = {"example": "one training example of a client",
                         "client": "all the data of one client"}[pp.unit]
            self.say(f"privacy: mode={pp.mode}, protects {unit_text}; noise multiplier "
                     f"{pp.noise_multiplier:.4g} (accounted as "
                     f"{pp.effective_noise_multiplier:.4g}), C={pc.clipping_norm}, "
                     f"delta={pc.delta:g}, planned epsilon {pp.planned_epsilon:.3f} "
                     f"({pc.accountant})")

    def _noise_key(self, prior: dict[str, Any] | None) -> NoiseKey | None:
        """The run's noise key: the checkpoint's when resuming, else a fresh secret (or
        the public one of ``privacy.noise_seed``); None without privacy."""
        if not self.pp.private:
            return None
        if prior is not None:
            stored = prior.get("noise_key")
            if not isinstance(stored, dict) or not isinstance(stored.get("secret"), str):
                raise OutputError("--resume", str(self.out),
                                  f"{CHECKPOINT_FILE} holds no noise key")
            try:
                return NoiseKey.from_hex(stored["secret"], bool(stored.get("reproducible")))
            except PrivacyError:
                raise OutputError("--resume", str(self.out),
                                  f"{CHECKPOINT_FILE} holds a damaged noise key") from None
        if self.pc.noise_seed is not None:
            return NoiseKey.from_seed(self.pc.noise_seed)
        return NoiseKey.generate()

    def restore(self, ck: dict[str, Any]) -> None:
        """Continue from a checkpoint written by :meth:`checkpoint`."""
        if ck["rng"]["next_round"] != ck["server_round"] + 1 or ck["rng"]["seed"] != self.cfg.seed:
            raise OutputError("--resume", str(self.out), "the checkpoint's RNG position "
                              "does not match its round and seed")
        self.backend.get(self.backend.submit(self.aggregator, "restore", ck["aggregator"]))
        if self.pp.private:
            from dplora_ray.privacy import PrivacyLedger

            self.ledger = PrivacyLedger.from_dict(ck["ledger"])
        self.rounds_rows = list(ck["rounds"])
        self.client_rows = list(ck["clients"])
        # (loss, accuracy, macro-F1) + weighted F1, kept apart (absent in older checkpoints)
        self.before = (*ck["eval_before"], ck.get("eval_before_f1_weighted"),
                       *ck.get("eval_before_generation", (math.nan, math.nan)))
        self.last_eval = (*ck["last_eval"], ck.get("last_eval_f1_weighted"),
                          *ck.get("last_eval_generation", (math.nan, math.nan)))
        self.stop_reason = ck["stop_reason"]
        self.done_rounds = int(ck["server_round"])
        self.finished = bool(ck["finished"])
        self.wall_before = float(ck["wall_seconds"])
        self.resumed_from = self.done_rounds
        self.say(f"resume: {self.done_rounds} of {self.fed.rounds} rounds done; continuing "
                 f"from round {self.done_rounds + 1}" if not self.finished else
                 f"resume: all rounds done ({self.stop_reason}); writing the results")

    def elapsed(self) -> float:
        return self.wall_before + time.perf_counter() - self.t_start

    def checkpoint(self) -> None:
        ck = self.backend.get(self.backend.submit(self.aggregator, "checkpoint"))
        ledger = None
        if self.pp.private:
            from dplora_ray.privacy.ledger import LEDGER_FORMAT

            ledger = {"format": LEDGER_FORMAT, "mode": self.ledger.mode,
                      "accountant": self.ledger.accountant, "delta": self.ledger.delta,
                      "unit_of_privacy": self.ledger.unit_of_privacy,
                      "entries": [e.to_dict() for e in self.ledger.entries]}
        payload = {
            "format": CHECKPOINT_FORMAT,
            "config": config_to_dict(self.cfg),
            "server_round": self.done_rounds,
            "finished": self.finished,
            "stop_reason": self.stop_reason,
            "aggregator": ck,
            "ledger": ledger,
            "rng": {"scheme": "public: (seed, stream, round, client); noise: (noise key, "
                              "stream, round, client, step); see dplora_ray.privacy.streams",
                    "seed": self.cfg.seed, "next_round": self.done_rounds + 1},
            # the ONLY copy of the secret: this file must not be shared (docs/privacy.md)
            "noise_key": (None if self.noise_key is None else
                          {"secret": self.noise_key.to_hex(),
                           "reproducible": self.noise_key.reproducible}),
            "cohorts": [[int(c) for c in cohort]
                        for cohort in self.plan.cohorts[:self.done_rounds]],
            "rounds": _plain(self.rounds_rows),
            "clients": _plain(self.client_rows),
            "eval_before": _plain(list(self.before[:3])),
            "last_eval": _plain(list(self.last_eval[:3])),
            "eval_before_f1_weighted": _plain(self.before[3]),
            "last_eval_f1_weighted": _plain(self.last_eval[3]),
            "eval_before_generation": _plain(list(self.before[4:6])),
            "last_eval_generation": _plain(list(self.last_eval[4:6])),
            "wall_seconds": self.elapsed(),
        }
        _write_checkpoint_atomic(payload, self.out / CHECKPOINT_FILE)

    def write_results(self) -> None:
        R.write_rounds(self.rounds_rows, self.out / "rounds.parquet")
        R.write_clients(self.client_rows, self.out / "clients.parquet")
        self.ledger.save(self.out / "ledger.json")

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, state_ref: Any) -> tuple[float, ...]:
        """Loss, accuracy, macro-F1, weighted F1, perplexity, ROUGE-L on the test split
        (what the task type does not have is NaN); fixed batches (see module doc).

        Batches are dealt round-robin to the workers that are up; a lost worker's
        batches move on to the next one (evaluation spends no privacy)."""
        from dplora_ray.federated.backends import WorkerLost

        backend, test = self.backend, self.plan.data.test
        merged: dict[str, Any] = {}
        ws = self.pool.usable()
        todo = {w: list(range(i, len(self.eval_chunks), len(ws))) for i, w in enumerate(ws)}
        losses_left = max(1, self.rt.max_worker_restarts) * len(backend.workers)
        while any(todo.values()):
            futs = {w: backend.submit(backend.workers[w], "evaluate_chunks", state_ref,
                                      [self.eval_chunks[j] for j in js])
                    for w, js in todo.items() if js}
            retry: list[int] = []
            for w, fut in futs.items():
                try:
                    parts = backend.get(fut)
                except WorkerLost as exc:
                    self._note(f"evaluation: worker {w} lost ({exc.reason}); its batches "
                               "move on")
                    self.pool.lost(w, exc.permanent)
                    retry += todo[w]
                    continue
                for j, part in zip(todo[w], parts):
                    where = self.eval_chunks[j]
                    for key, values in part.items():
                        if key not in merged:
                            merged[key] = ([None] * len(test) if isinstance(values, list)
                                           else np.zeros(len(test), dtype=values.dtype))
                        if isinstance(values, list):
                            for i, v in zip(where, values):
                                merged[key][i] = v
                        else:
                            merged[key][where] = values
            todo = {}
            if retry:
                losses_left -= 1
                if losses_left < 0:
                    raise RunFailedError("evaluation failed: client workers kept dying")
                todo = {self.pool.usable()[0]: sorted(retry)}
        from dplora_ray.data.metrics import f1_macro, f1_weighted, perplexity, rouge_l

        if self.plan.data.task_type == "generation":
            tokens = merged["tokens"]
            ppl = perplexity(merged["nll"], tokens)
            loss = float(merged["nll"].sum() / max(1, tokens.sum()))  # per answer token
            tok = self.plan.tokenizer
            answers = [tok.decode(ids, skip_special_tokens=True) for ids in merged["generated"]]
            return (loss, math.nan, math.nan, math.nan, ppl,
                    rouge_l(answers, self.plan.references))
        losses, preds = merged["loss"], merged["pred"]
        y, k = test.labels, self.plan.data.num_labels
        return (float(losses.mean()), float((preds == y).mean()), f1_macro(y, preds, k),
                f1_weighted(y, preds, k), math.nan, math.nan)

    def _note(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)
        else:
            self.say(msg)

    # ------------------------------------------------------------------ rounds
    def execute(self) -> dict[str, Any]:
        try:
            if not self.finished:
                self.bar = _Progress(self.fed.rounds, self.done_rounds, self.progress, self.say)
                try:
                    for r in range(self.done_rounds + 1, self.fed.rounds + 1):
                        if not self.run_round(r, self.plan.cohorts[r - 1]):
                            break
                finally:
                    self.bar.close()
                self.finished = True
                self.checkpoint()
            return self.finish()
        except BaseException as exc:
            if self.folder_ready:
                self.write_summary(f"error: {_one_line(exc)}")
            raise

    def run_round(self, r: int, cohort: np.ndarray) -> bool:
        """Run round ``r``; False when the budget guard stops the run before it."""
        cfg, fed, pp, backend = self.cfg, self.fed, self.pp, self.backend
        t0 = time.perf_counter()
        entries = self.plan.ledger_entries(r, cohort)
        budget = pp.budget
        if (budget is not None and entries
                and self.ledger.epsilon_if(entries) > budget * (1 + 1e-9)):
            self.stop_reason = STOP_BUDGET
            self._note(f"round {r}: stopping before it would push epsilon past "
                       f"privacy.max_epsilon={budget}")
            return False
        state_ref = backend.submit(self.aggregator, "get_state")
        # CMFL's reference: the last applied global update (None otherwise)
        self.last_update_ref = (backend.submit(self.aggregator, "get_last_update")
                                if fed.compression == "cmfl" else None)
        mech = pp.mechanism
        client_noise = self.noise_key is not None and mech.noise_by == "client"
        jobs = {int(cid): ClientJob(
                    client_id=int(cid), indices=self.plan.parts[int(cid)],
                    seed=public_seed(cfg.seed, PublicStream.CLIENT, r, int(cid)),
                    noise_multiplier=pp.noise_multiplier,
                    noise_key=(self.noise_key.derive(mech.noise_stream, r, int(cid))
                               if client_noise else None))
                for cid in cohort}
        pending: dict[Any, _Pending] = {}
        ws = self.pool.usable()
        for pos, cid in enumerate(sorted(jobs)):
            w = ws[pos % len(ws)]
            meta, payload = backend.submit_client(w, state_ref, jobs[cid], r, 0,
                                                  self.last_update_ref)
            pending[meta] = _Pending(cid, w, 0, payload)
        for e in entries:  # charged whether or not the client completes
            self.ledger.append(e)
        outcomes = self.gather(r, jobs, pending, state_ref, t0)

        accepted = [cid for cid in sorted(outcomes)
                    if outcomes[cid].status in ACCEPTED_STATUSES]
        backend.get(backend.submit(
            self.aggregator, "step", r, pp.noise_multiplier, float(fed.clients_per_round),
            [len(self.plan.parts[c]) for c in accepted],
            *[outcomes[c].payload for c in accepted]))
        do_eval = (r % fed.eval_every == 0) or r == fed.rounds
        if do_eval:
            self.last_eval = self.evaluate(backend.submit(self.aggregator, "get_state"))
        eval_loss, eval_acc, eval_f1, eval_f1w, eval_ppl, eval_rouge = (
            self.last_eval if do_eval else (math.nan,) * 6)
        eps_units = self.ledger.epsilons() if pp.private else {}
        epsilon = max(eps_units.values()) if eps_units else None
        eps_mean = float(np.mean(list(eps_units.values()))) if eps_units else None
        self.add_client_rows(r, outcomes, eps_units, epsilon)
        losses = [outcomes[c].result.train_loss for c in accepted
                  if math.isfinite(outcomes[c].result.train_loss)]
        row = {
            R.SERVER_ROUND: r,
            R.TRAIN_LOSS: float(np.mean(losses)) if losses else math.nan,
            R.EVAL_LOSS: eval_loss, R.EVAL_ACCURACY: eval_acc, R.EVAL_F1_MACRO: eval_f1,
            R.EVAL_F1_WEIGHTED: eval_f1w, R.EVAL_PERPLEXITY: eval_ppl, R.EVAL_ROUGE_L: eval_rouge,
            R.NUM_CLIENTS_SAMPLED: len(cohort), R.NUM_CLIENTS_COMPLETED: len(accepted),
            R.BYTES_UP: int(sum(o.result.bytes_up for o in outcomes.values()
                                if o.result is not None)),
            R.BYTES_DOWN: self.down_bytes * len(cohort),
            R.ROUND_SECONDS: time.perf_counter() - t0, R.EPSILON: epsilon,
            R.EPSILON_MEAN: eps_mean,
            R.NOISE_MULTIPLIER: pp.noise_multiplier if pp.private else None,
        }
        self.rounds_rows.append(row)
        self.done_rounds = r
        self.checkpoint()  # first the checkpoint, then the files it can rebuild
        self.write_results()
        shown = ({"rougeL": _fmt(self.last_eval[5])} if self.plan.data.task_type == "generation"
                 else {"acc": _fmt(self.last_eval[1])})
        self.bar.update(loss=_fmt(row[R.TRAIN_LOSS]), **shown, eps=_fmt(epsilon, ".2f"))
        return True

    def add_client_rows(self, r: int, outcomes: dict[int, _Outcome],
                        eps_units: dict[str, float], epsilon: float | None) -> None:
        per_unit = self.pp.mechanism.per_client_epsilon()
        for cid in sorted(outcomes):
            o, x = outcomes[cid], outcomes[cid].result
            row = {
                R.SERVER_ROUND: r, R.CLIENT_ID: cid, R.WORKER: o.worker, R.STATUS: o.status,
                R.NUM_EXAMPLES: len(self.plan.parts[cid]), R.BYTES_DOWN: self.down_bytes,
                R.SAMPLING_RATE: self.plan.client_rate(cid),
                R.EPSILON: eps_units.get(client_unit(cid)) if per_unit else epsilon,
                R.TRAIN_LOSS: math.nan, R.UPDATE_NORM: math.nan, R.BYTES_UP: 0,
                R.SECONDS: math.nan, R.STEPS: 0,
            }
            if x is not None and o.status not in (STATUS_ABORTED, STATUS_FAILED):
                row.update({R.NUM_EXAMPLES: x.num_examples, R.TRAIN_LOSS: x.train_loss,
                            R.UPDATE_NORM: x.update_norm, R.BYTES_UP: x.bytes_up,
                            R.SECONDS: x.seconds, R.STEPS: x.steps,
                            R.SAMPLING_RATE: x.sampling_rate})
            self.client_rows.append(row)
            if o.status not in (STATUS_OK, STATUS_FAILED_RETRIED, STATUS_SKIPPED_IRRELEVANT):
                self._note(f"round {r}: client {cid} {o.status}")

    def gather(self, r: int, jobs: dict[int, ClientJob], pending: dict[Any, _Pending],
               state_ref: Any, t0: float) -> dict[int, _Outcome]:
        """Collect the round's client results, applying the failure and time policies."""
        from dplora_ray.federated.backends import WorkerLost

        backend, rt = self.backend, self.rt
        outcomes: dict[int, _Outcome] = {}
        retried: set[int] = set()
        deadline = None if rt.round_timeout_s is None else t0 + rt.round_timeout_s
        max_retries = max(1, rt.max_worker_restarts)
        while pending:
            remaining = None if deadline is None else max(0.0, deadline - time.perf_counter())
            ready = backend.wait(list(pending), remaining)
            if not ready:  # the round's time is up: everything still pending is late
                busy = sorted({p.worker for p in pending.values()})
                for p in pending.values():
                    outcomes[p.client_id] = _Outcome(STATUS_DROPPED_TIMEOUT, p.worker)
                pending.clear()
                self._note(f"round {r}: {rt.round_timeout_s:g} s are up; dropping "
                           f"{sum(o.status == STATUS_DROPPED_TIMEOUT for o in outcomes.values())}"
                           f" late client(s), restarting worker(s) {busy}")
                for w in busy:
                    backend.restart_worker(w)
                    self.pool.lost(w)
                break
            for fut in ready:
                p = pending.pop(fut)
                try:
                    res = backend.result(fut)
                except WorkerLost as exc:
                    self.on_lost(r, p, exc, jobs, pending, outcomes, retried, state_ref,
                                 max_retries)
                    continue
                status = res.status
                if p.client_id in retried and status == STATUS_OK:
                    status = STATUS_FAILED_RETRIED
                outcomes[p.client_id] = _Outcome(status, p.worker, res, p.payload)
        return outcomes

    def on_lost(self, r: int, p: _Pending, exc: Any, jobs: dict[int, ClientJob],
                pending: dict[Any, _Pending], outcomes: dict[int, _Outcome],
                retried: set[int], state_ref: Any, max_retries: int) -> None:
        policy = self.rt.on_client_failure
        what = f"round {r}: worker {p.worker} lost while training client {p.client_id}"
        self.pool.lost(p.worker, exc.permanent)
        if policy == "retry" and p.attempt < max_retries:
            w = self.pool.next_after(p.worker)
            meta, payload = self.backend.submit_client(w, state_ref, jobs[p.client_id], r,
                                                       p.attempt + 1, self.last_update_ref)
            pending[meta] = _Pending(p.client_id, w, p.attempt + 1, payload)
            retried.add(p.client_id)
            self._note(f"{what} ({exc.reason}); re-running it on worker {w} "
                       f"(attempt {p.attempt + 2}, same RNG stream)")
            return
        if policy == "drop":
            outcomes[p.client_id] = _Outcome(STATUS_DROPPED_FAILURE, p.worker)
            self._note(f"{what} ({exc.reason}); dropped from the round "
                       "(runtime.on_client_failure=drop)")
            return
        # fail, or retries exhausted: record the round as far as it went, then end
        outcomes[p.client_id] = _Outcome(STATUS_FAILED, p.worker)
        for q in pending.values():
            outcomes[q.client_id] = _Outcome(STATUS_ABORTED, q.worker)
        pending.clear()
        for o in outcomes.values():
            if o.status != STATUS_FAILED:
                o.status = STATUS_ABORTED
        eps_units = self.ledger.epsilons() if self.pp.private else {}
        self.add_client_rows(r, outcomes, eps_units, max(eps_units.values(), default=None))
        self.write_results()  # the finished rounds, this round's rows, all charges
        why = (f"runtime.on_client_failure={policy!r}" if policy != "retry" else
               f"lost {p.attempt + 1} times (runtime.max_worker_restarts="
               f"{self.rt.max_worker_restarts})")
        raise RunFailedError(f"{what} ({exc.reason}); {why}: the run stops after "
                             f"{r - 1} round(s); continue it with --resume")

    # ------------------------------------------------------------------ the end
    def finish(self) -> dict[str, Any]:
        from dplora_ray.models import save_adapter

        final_state = self.backend.get(self.backend.submit(self.aggregator, "get_state"))
        full = dict(self.init_full)
        full.update(dict(final_state))
        if self.fed.strategy == "full":  # Vanilla FL: the whole model
            from dplora_ray.models import save_full_model

            save_full_model(self.out / "model", self.cfg.model, full)
        else:
            save_adapter(self.out / "adapter", self.cfg.lora, self.plan.model_source, full)
        if self.plan.audit is not None:  # issue 8: empirical privacy audit (docs/audit.md)
            from dplora_ray.audit import run_audit

            self.audit_summary = run_audit(
                self.plan.audit, self.backend, initial=self.initial, final=final_state,
                mode=self.pp.mode, epsilons=self.ledger.epsilons(), delta=self.pc.delta,
                confidence=self.cfg.audit.confidence, out_dir=self.out,
                run_seconds=self.elapsed(), say=self.say)
            if self.rounds_rows:
                self.rounds_rows[-1].update(
                    {k: self.audit_summary[k] for k in R.AUDIT_ROUND_COLUMNS})
        self.write_results()
        return self.write_summary(self.stop_reason)

    def write_summary(self, stop_reason: str) -> dict[str, Any]:
        pp, pc, fed, rows = self.pp, self.pc, self.fed, self.rounds_rows
        private = pp.private
        def none_if_nan(ev: tuple[Any, ...]) -> tuple[Any, ...]:  # metrics of another task
            return tuple(None if isinstance(x, float) and math.isnan(x) else x for x in ev)

        before = none_if_nan(getattr(self, "before", (None,) * 6))
        last = none_if_nan(self.last_eval) if rows else (None,) * 6
        summary = {
            "eval_accuracy_before": before[1],
            "eval_f1_macro_before": before[2],
            "eval_f1_weighted_before": before[3],
            "eval_loss_before": before[0],
            "eval_accuracy": last[1],
            "eval_f1_macro": last[2],
            "eval_f1_weighted": last[3],
            "eval_loss": last[0],
            "eval_perplexity_before": before[4],
            "eval_perplexity": last[4],
            "eval_rouge_l_before": before[5],
            "eval_rouge_l": last[5],
            "task_type": self.plan.data.task_type,
            "epsilon": self.ledger.epsilon() if private else None,
            "delta": pc.delta if private else None,
            "noise_multiplier": pp.noise_multiplier if private else None,
            "effective_noise_multiplier": pp.effective_noise_multiplier if private else None,
            "planned_epsilon": pp.planned_epsilon,
            "privacy_mode": pp.mode,
            "privacy_unit": pp.unit,
            "accountant": pc.accountant if private else None,
            # true: the noise is a public function of privacy.noise_seed (not private
            # against anyone who knows it); false: a secret key from the OS
            "noise_reproducible": (self.noise_key.reproducible if private
                                   and getattr(self, "noise_key", None) is not None else None),
            "rounds_completed": len(rows),
            "rounds_planned": fed.rounds,
            "stop_reason": stop_reason,
            "bytes_up_total": int(sum(r_[R.BYTES_UP] for r_ in rows)),
            "bytes_down_total": int(sum(r_[R.BYTES_DOWN] for r_ in rows)),
            "wall_seconds": self.elapsed(),
            "trainable_parameters": int(sum(v.numel() for v in self.initial.values())),
            "model": self.cfg.model.name,
            "num_train_examples": len(self.plan.data.train),
            "num_test_examples": len(self.plan.data.test),
            "clients_not_aggregated": int(sum(
                row[R.STATUS] not in ACCEPTED_STATUSES for row in self.client_rows)),
            "resumed_from_round": self.resumed_from,
            "output_dir": str(self.out),
        }
        # issue 8: audit keys in every summary (null unless audit.enabled)
        summary.update(getattr(self, "audit_summary", None)
                       or dict.fromkeys(R.AUDIT_SUMMARY_KEYS))
        R.write_json_atomic(summary, self.out / "summary.json")
        return summary
