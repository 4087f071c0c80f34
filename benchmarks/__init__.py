"""Benchmarks of dplora_ray against the scale targets (issue 6); run ``python -m benchmarks``.

Modules, one per benchmark:

* :mod:`benchmarks.round_overhead`: wall time of a round / the busiest worker's compute
  (tiny model, 64 clients per round, 2 workers; target <= 1.10), with the split of the
  overhead from an instrumented round (:mod:`benchmarks.harness`).
* :mod:`benchmarks.memory`: peak RSS of all processes of a run and start-up time with
  10, 1,000 and 10,000 clients in the population (target: 10,000 <= 1.25x 10).
* :mod:`benchmarks.dp_overhead`: one DP-SGD step / one non-private step on SmolLM2-135M
  (target <= 1.5); Opacus hooks vs ghost clipping.
* :mod:`benchmarks.communication`: bytes per client and round, LoRA vs full fine-tuning,
  FFA-LoRA and the transfer dtype; serialisation overhead of the payload (target < 1%).
* :mod:`benchmarks.throughput`: client updates per second and training tokens per
  second per worker, 1 and 2 workers.
* :mod:`benchmarks.audit_cost`: wall time of a run with the empirical privacy audit on
  vs off (``audit_cost_fraction``; target < 0.20).
* :mod:`benchmarks.gpu`: fractional ``gpus_per_worker`` (measured only where a GPU is).

Run on their own (not part of ``python -m benchmarks``): :mod:`benchmarks.physical_batch`
(logical vs physical batch) and :mod:`benchmarks.resources_check` (a worker's peak RSS
by base dtype and gradient checkpointing against ``dplora-ray resources``, issue 18).

Figures, command and machine of the last full run: docs/benchmarks.md.
"""

BENCHMARKS = ("memory", "round_overhead", "throughput", "gpu", "dp_overhead", "communication",
              "audit_cost")

__all__ = ["BENCHMARKS"]
