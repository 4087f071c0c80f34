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
   ``clients.parquet`` / ``ledger.json`` (each atomically) -> log the round to the
   trackers of the ``tracking`` section (:mod:`dplora_ray.tracking`);
4. write the adapter, ``summary.json`` and, from the same values, the adapter's
   privacy model card (``adapter/README.md``, :mod:`dplora_ray.model_card`); then
   the trackers' artifacts and tags.

An exception after the folder exists (a worker failure under ``on_client_failure:
fail``, an interrupt, a bug) still writes ``summary.json``, with ``stop_reason: "error:
..."``, so a folder never looks complete when it is not.

Randomness and checkpoints: see :mod:`dplora_ray.privacy.streams` (public seed vs
secret noise key) and :mod:`dplora_ray.federated.checkpoint` (what ``checkpoint.pt``
holds; a fresh run writes a round-0 checkpoint before dispatching anything, so a run
killed in its first round resumes with its noise key). Re-running a round after a resume
releases nothing new: the same public seeds and the same noise key give the same updates.

Layout: :mod:`~dplora_ray.federated.planning` (the plan, before any output),
:mod:`~dplora_ray.federated.pool` (workers up/down, scatter with retry),
:mod:`~dplora_ray.federated.evaluation`, :mod:`~dplora_ray.federated.failure_policy`,
:mod:`~dplora_ray.federated.checkpoint`; this module only runs rounds.

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

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch  # noqa: F401  (tests patch runner.torch.save: the checkpoint's writer)

from dplora_ray import results as R
from dplora_ray.config import ExperimentConfig, config_to_dict, save_config
from dplora_ray.errors import OutputError, RunInterrupted
from dplora_ray.federated.checkpoint import (
    CHECKPOINT_FILE,
    CHECKPOINT_FORMAT,
    check_data,
    load_checkpoint,
    noise_key_of,
    plain,
    resume_point,
    write_checkpoint,
)
from dplora_ray.federated.client import tensor_bytes
from dplora_ray.federated.evaluation import eval_chunks, evaluate
from dplora_ray.federated.failure_policy import max_retries, stop_text
from dplora_ray.federated.planning import (
    RunPlan,
    check_output,
    cohort_mode,
    derive_seed,
    plan_run,
    sample_cohorts,
)
from dplora_ray.federated.pool import Backend, WorkerPool
from dplora_ray.federated.progress import Progress
from dplora_ray.federated.rounds import STOP_COMPLETED, RoundsMixin
from dplora_ray.outputs import (
    RUN_OUTPUTS,
    check_writable,
    clear_outputs,
    finished_summary,
    missing_results,
    remove_temp_files,
    write_folder_atomic,
)
from dplora_ray.privacy.ledger import NoLedger
from dplora_ray.privacy.mechanisms import ALL_CLIENTS
from dplora_ray.privacy.plan import PrivacyPlan
from dplora_ray.privacy.streams import NoiseKey
from dplora_ray.results import (
    ACCEPTED_STATUSES,
    CLIENT_STATUSES,
    EvalResult,
)
from dplora_ray.tracking import Tracker

__all__ = ["ACCEPTED_STATUSES", "CHECKPOINT_FILE", "CLIENT_STATUSES", "PrivacyPlan", "RunPlan",
           "cohort_mode", "derive_seed", "load_checkpoint", "plan_run", "run_experiment",
           "sample_cohorts"]

UNIT_ALL_CLIENTS = ALL_CLIENTS


# =========================================================================== the run
def run_experiment(cfg: ExperimentConfig, out_dir: str | Path, *, overwrite: bool = False,
                   resume: bool = False, progress: bool = True,
                   log: Callable[[str], None] | None = None,
                   tracker: Tracker | None = None) -> dict[str, Any]:
    """Run one federated experiment and write its results into ``out_dir``.

    Args:
        cfg: the experiment.
        out_dir: the run folder.
        overwrite: replace a non-empty ``out_dir`` (ignored with ``resume``).
        resume: continue the run in ``out_dir`` from its last checkpoint: every key
            that changes what is computed must equal the saved config's (else
            ConfigError); an empty or missing ``out_dir`` starts a new run there; a
            finished run returns its summary.
        progress: show a progress bar.
        log: where messages go (default: stderr).
        tracker: the run's :class:`~dplora_ray.tracking.Tracker` (default: from
            ``cfg.tracking``; checked before anything else).

    Returns the summary dict (also written as ``summary.json``).

    Raises:
        DpLoraError: bad input (before anything is written), or RunFailedError when the
            run ends early (after writing the results so far and an error summary).
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    say = log or (lambda m: print(m, file=sys.stderr))
    tracker = tracker or Tracker(cfg, out, say)  # refuses missing packages, bad URIs
    prior: dict[str, Any] | None = None
    kept: dict[str, Any] | None = None  # a finished run's summary, kept as it is
    changed: list[str] = []
    if resume:
        prior, changed = resume_point(cfg, out)
        if prior is not None and prior.get("finished"):
            kept = finished_summary(out)
            missing = missing_results(out, full_model=cfg.federation.strategy == "full",
                                      audit=cfg.audit.enabled)
            if kept is not None and not missing:
                say(f"resume: {out} is already finished ({kept['stop_reason']})")
                return tracker.finish(kept, prior["rounds"])  # logs what trackers miss
            if kept is not None:
                say(f"resume: {out} is finished but lacks {', '.join(missing)}; "
                    f"rebuilding from {CHECKPOINT_FILE}")
        if prior is not None:
            check_data(prior, None, cfg, out)  # a v2 checkpoint: refused before any load
        check_writable(out, "--resume")
    else:
        check_output(out, overwrite)
    plan = plan_run(cfg)
    if prior is not None:
        check_data(prior, plan.fingerprint, cfg, out)
        drawn = [[int(c) for c in cohort] for cohort in plan.cohorts[:prior["server_round"]]]
        if drawn != prior["cohorts"]:  # the schedule is a function of (config, seed)
            raise OutputError("--resume", str(out), "the checkpoint's cohort history does "
                              "not match the cohorts drawn again from its config and seed")
    for c in changed:  # validated: now say what runs differently
        say(f"resume: {c}")

    from dplora_ray.federated.backends import make_backend

    say(f"starting {cfg.runtime.backend} backend "
        f"({cfg.runtime.num_workers if cfg.runtime.backend == 'actors' else 1} worker(s), "
        f"model {cfg.model.name})")
    backend = make_backend(cfg, plan.data)
    try:
        run = _Run(cfg, plan, backend, out, say, progress, t_start)
        run.kept_summary, run.tracker = kept, tracker
        run.start(prior, overwrite=overwrite and not resume)
        return run.execute()
    finally:
        tracker.close()  # an unfinished MLflow run ends FAILED (KILLED on Ctrl-C)
        backend.shutdown()


class _Run(RoundsMixin):
    """One experiment on a started backend (driver side); the rounds themselves are
    :class:`~dplora_ray.federated.rounds.RoundsMixin`'s."""

    def __init__(self, cfg: ExperimentConfig, plan: RunPlan, backend: Backend, out: Path,
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
        self.rounds_kept = 0
        self.bar: Progress | None = None
        self.last_update_ref: Any = None  # CMFL's reference, this round's
        self.noise_key: NoiseKey | None = None
        self.before: EvalResult | None = None
        self.last_eval = EvalResult()
        self.audit_summary: dict[str, Any] | None = None
        self.kept_summary: dict[str, Any] | None = None

    # ------------------------------------------------------------------ set-up
    def start(self, prior: dict[str, Any] | None, overwrite: bool) -> None:
        cfg, pc, pp, backend = self.cfg, self.pc, self.pp, self.backend
        self.pool = WorkerPool(backend, self._note)
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
        if pp.private:  # the checkpoint's key when resuming, else a fresh secret
            self.noise_key = (noise_key_of(prior, self.out) if prior is not None else
                              NoiseKey.from_seed(pc.noise_seed) if pc.noise_seed is not None
                              else NoiseKey.generate())
        key = self.noise_key
        self.aggregator = backend.make_aggregator(
            initial=self.initial, mode=pp.mode, server_learning_rate=self.fed.server_learning_rate,
            clipping_norm=pc.clipping_norm,
            noise_key=mech.noise_key_for(key, "server"),
            keep_last_update=self.fed.compression == "cmfl",
            server_optimizer=self.fed.server_optimizer,
            server_options={"momentum": self.fed.server_momentum,
                            "beta1": self.fed.server_beta1, "beta2": self.fed.server_beta2,
                            "tau": self.fed.server_tau})
        from dplora_ray.federated.client import TRANSFER_DTYPES

        tdtype = TRANSFER_DTYPES[self.fed.transfer_dtype]
        self.down_bytes = tensor_bytes({k: v.to(tdtype) for k, v in self.initial.items()})
        self.eval_chunks = eval_chunks(self.plan)
        if pp.private:
            from dplora_ray.privacy import PrivacyLedger

            self.ledger: Any = PrivacyLedger(mode=pc.mode, accountant=pc.accountant,
                                             delta=pc.delta, unit_of_privacy=pp.unit)
        else:
            self.ledger = NoLedger()

        if prior is None:
            self.before = self.evaluate(backend.put(self.initial))
            self.last_eval = self.before
            self.say(f"eval before training: {self.before.describe()} "
                     f"({len(self.plan.data.test)} held-out examples)")
        else:
            self.restore(prior)

        # ---- everything validated: from here on we write into `out`
        out = self.out
        if prior is None:
            if overwrite:  # only what a run writes (check_output refused anything else)
                clear_outputs(out, RUN_OUTPUTS)
            out.mkdir(parents=True, exist_ok=True)
            for stale in ("summary.json", CHECKPOINT_FILE):  # an earlier attempt's
                (out / stale).unlink(missing_ok=True)
        elif self.kept_summary is None:
            (out / "summary.json").unlink(missing_ok=True)  # not finished any more
        remove_temp_files(out)  # what a killed earlier attempt left
        save_config(cfg, out / "config.yaml")
        self.folder_ready = True
        if prior is not None:  # the result files as of the checkpoint
            self.write_results()
        else:  # round 0: the noise key is on disk before anything is released
            self.checkpoint()
        self.tracker.log_rounds(self.rounds_rows)  # opens; a resumed run: what they miss
        if key is not None and key.reproducible:
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
        self.before = EvalResult.from_dict(ck["eval_before"])
        self.last_eval = EvalResult.from_dict(ck["last_eval"])
        self.stop_reason = ck["stop_reason"]
        self.done_rounds = self.rounds_kept = int(ck["server_round"])
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
        key = self.noise_key
        payload = {
            "format": CHECKPOINT_FORMAT,
            "config": config_to_dict(self.cfg),
            "server_round": self.done_rounds,
            "finished": self.finished,
            "stop_reason": self.stop_reason,
            "aggregator": ck,
            "ledger": self.ledger.state_dict() if self.pp.private else None,
            "rng": {"scheme": "public: (seed, stream, round, client); noise: (noise key, "
                              "stream, round, client, step); see dplora_ray.privacy.streams",
                    "seed": self.cfg.seed, "next_round": self.done_rounds + 1},
            # the ONLY copy of the secret: this file must not be shared (docs/privacy.md)
            "noise_key": (None if key is None else
                          {"secret": key.to_hex(), "reproducible": key.reproducible}),
            "cohorts": [[int(c) for c in cohort]
                        for cohort in self.plan.cohorts[:self.done_rounds]],
            "rounds": plain(self.rounds_rows),
            "clients": plain(self.client_rows),
            "eval_before": plain((self.before or EvalResult()).to_dict()),
            "last_eval": plain(self.last_eval.to_dict()),
            "wall_seconds": self.elapsed(),
            "data_fingerprint": self.plan.fingerprint,  # resume checks the data
        }
        write_checkpoint(payload, self.out / CHECKPOINT_FILE)
        self.rounds_kept = self.done_rounds  # what --resume continues from

    def write_results(self) -> None:
        R.write_rounds(self.rounds_rows, self.out / "rounds.parquet")
        R.write_clients(self.client_rows, self.out / "clients.parquet")
        self.ledger.save(self.out / "ledger.json")

    def evaluate(self, state_ref: Any) -> EvalResult:
        return evaluate(self.pool, self.plan, self.eval_chunks, state_ref,
                        max_losses=max_retries(self.rt) * len(self.backend.workers),
                        note=self._note)

    def _note(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)
        else:
            self.say(msg)

    # ------------------------------------------------------------------ rounds
    def execute(self) -> dict[str, Any]:
        try:
            if not self.finished:
                self.bar = Progress(self.fed.rounds, self.done_rounds, self.progress, self.say)
                try:
                    for r in range(self.done_rounds + 1, self.fed.rounds + 1):
                        if not self.run_round(r, self.plan.cohorts[r - 1]):
                            break
                finally:
                    self.bar.close()
                self.finished = True
                self.checkpoint()
            return self.tracker.finish(self.finish())  # after all finish writes
        except BaseException as exc:
            try:  # a second Ctrl-C skips this (what is done is in the checkpoint anyway)
                if self.folder_ready:
                    try:
                        self.write_summary(f"error: {stop_text(exc)}")
                    except OSError:  # e.g. the disk is full: the first error is the one to tell
                        pass
                    remove_temp_files(self.out)
            finally:
                if isinstance(exc, KeyboardInterrupt) and self.folder_ready:
                    raise RunInterrupted(self.rounds_kept, str(self.out)) from None
            raise

    # ------------------------------------------------------------------ the end
    def finish(self) -> dict[str, Any]:
        from dplora_ray.models import save_adapter

        final_state = self.backend.get(self.backend.submit(self.aggregator, "get_state"))
        full = dict(self.init_full)
        full.update(dict(final_state))
        if self.fed.strategy == "full":  # Vanilla FL: the whole model
            from dplora_ray.models import save_full_model

            write_folder_atomic(self.out / "model",
                                lambda d: save_full_model(d, self.cfg.model, full))
        else:
            write_folder_atomic(self.out / "adapter", lambda d: save_adapter(
                d, self.cfg.lora, self.plan.model_source, full))
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
        elif self.cfg.audit.enabled:  # issue 17: white-box / one-run (dplora_ray.audit.modes)
            from dplora_ray.audit.modes import audit_after_run
            self.audit_summary = audit_after_run(self.cfg, self.out, self.pp, self.say,
                                                 self.rounds_rows)
        self.write_results()
        # kept_summary: rebuilt a finished run's missing files
        summary = (self.kept_summary if self.kept_summary is not None
                   else self.write_summary(self.stop_reason))
        from dplora_ray.model_card import write_model_card  # issue 21: the privacy card

        write_model_card(self.out / ("model" if self.fed.strategy == "full" else "adapter"),
                         summary, self.ledger.state_dict() if self.pp.private else None,
                         self.cfg)
        return summary

    def write_summary(self, stop_reason: str) -> dict[str, Any]:
        pp, pc, fed, rows = self.pp, self.pc, self.fed, self.rounds_rows
        private = pp.private
        summary = R.Summary(
            **R.eval_summary_fields(self.before, self.last_eval if rows else None),
            task_type=self.plan.data.task_type,
            epsilon=self.ledger.epsilon() if private else None,
            delta=pc.delta if private else None,
            noise_multiplier=pp.noise_multiplier if private else None,
            effective_noise_multiplier=pp.effective_noise_multiplier if private else None,
            planned_epsilon=pp.planned_epsilon,
            privacy_mode=pp.mode, privacy_unit=pp.unit,
            accountant=pc.accountant if private else None,
            noise_reproducible=(self.noise_key.reproducible
                                if private and self.noise_key is not None else None),
            rounds_completed=len(rows), rounds_planned=fed.rounds, stop_reason=stop_reason,
            bytes_up_total=int(sum(r_[R.BYTES_UP] for r_ in rows)),
            bytes_down_total=int(sum(r_[R.BYTES_DOWN] for r_ in rows)),
            wall_seconds=self.elapsed(),
            trainable_parameters=int(sum(v.numel() for v in self.initial.values())),
            model=self.cfg.model.name,
            num_train_examples=len(self.plan.data.train),
            num_test_examples=len(self.plan.data.test),
            clients_not_aggregated=int(sum(
                row[R.STATUS] not in ACCEPTED_STATUSES for row in self.client_rows)),
            resumed_from_round=self.resumed_from, output_dir=str(self.out),
            audit=self.audit_summary)
        return R.write_summary(summary, self.out / "summary.json")
