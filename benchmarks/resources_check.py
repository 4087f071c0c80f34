"""The memory estimate of ``dplora-ray resources`` against a worker's measured peak RSS.

For each variant of the base (``model.dtype``, ``model.gradient_checkpointing``) a fresh
process (``python -m benchmarks.resources_check --one VARIANT ...``) builds one client
worker (inline, as a Ray actor would) with the config's recipe (default
``configs/demo.yaml``: SmolLM2-135M, DP-SGD, FFA-LoRA r=8 on q/v, AdamW, bf16 autocast)
and runs a few DP-SGD steps on random tokens, every sequence exactly ``--max-length``
tokens; the client holds ``--batch`` examples and the batch size is ``--batch`` (Poisson
rate 1), with ``runtime.max_physical_batch_size`` = ``--batch``, so every pass is exactly
batch x max_length tokens. A thread samples the process's RSS every 5 ms; reported: the
RSS after the imports (the runtime overhead), after building the worker, the peak during
the steps, the estimate (:func:`dplora_ray.resources.estimate`, with its fixed
0.5 GiB overhead) and estimate / measured peak. Step times on a shared machine are
contention-dependent.

The estimate counts live tensors. glibc's malloc raises its mmap threshold dynamically
(up to 32 MiB) once large blocks are freed, after which activation-sized tensors come from
the heap and freed ones stay in the RSS: with the ``default`` allocator the peak RSS of a
float32 base was measured 1.3x the live tensors. Each variant therefore also runs with
``MALLOC_MMAP_THRESHOLD_=131072`` (``mmap``: every block above 128 KiB is its own mmap,
returned at free), where the RSS follows the live tensors.

``python -m benchmarks.resources_check [--config C] [--batch 8] [--max-length 128]
[--steps 3] [--variants float32,bfloat16,float32+ckpt,bfloat16+ckpt]
[--allocators default,mmap] [--json PATH]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, fixed_length_data, set_default_env

__all__ = ["VARIANTS", "measure", "run_one"]

VARIANTS = ("float32", "bfloat16", "float32+ckpt", "bfloat16+ckpt")
ALLOCATORS = ("default", "mmap")
#: glibc: serve every allocation above 128 KiB with its own mmap (a fixed threshold, no
#: dynamic raise), so that a freed tensor leaves the RSS at once
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
_LABEL_IDS = (100, 200, 300)


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


def _overrides(variant: str, batch: int, max_length: int, steps: int) -> list[str]:
    dtype, _, ckpt = variant.partition("+")
    return ["runtime.backend=inline", "runtime.torch_threads=1", f"model.dtype={dtype}",
            f"model.gradient_checkpointing={'true' if ckpt else 'false'}",
            f"model.max_length={max_length}", f"federation.batch_size={batch}",
            f"runtime.max_physical_batch_size={batch}", f"federation.local_steps={steps}",
            *(["runtime.bf16_autocast=false"] if dtype == "float16" else [])]


def run_one(config: Path, variant: str, batch: int, max_length: int, steps: int
            ) -> dict[str, Any]:
    """One variant in this process (call it in a fresh process)."""
    set_default_env()
    import numpy as np

    from dplora_ray.config import load_config
    from dplora_ray.federated.client import ClientJob, ClientWorker
    from dplora_ray.privacy.streams import NoiseKey
    from dplora_ray.resources import estimate, model_shape

    after_imports = _rss()
    cfg = load_config(config, _overrides(variant, batch, max_length, steps))
    shape = model_shape(cfg.model, cfg.lora.target_modules)
    est = estimate(cfg, shape)
    data = fixed_length_data(shape.vocab, max_length, batch, 8, _LABEL_IDS)
    t0 = time.perf_counter()
    worker = ClientWorker(cfg, data)
    load_seconds = time.perf_counter() - t0
    after_load = _rss()
    start = worker.initial_state()
    job = ClientJob(client_id=0, indices=np.arange(batch), seed=1, noise_multiplier=0.5,
                    noise_key=NoiseKey.from_seed(0))
    peak = [after_load]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            done.wait(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t1 = time.perf_counter()
    result = worker.train_client({k: start[k] for k in worker.trainable_keys()}, job)
    seconds = time.perf_counter() - t1
    done.set()
    sampler.join()
    measured = max(peak[0], _rss())
    total = est.total(cfg.model.gradient_checkpointing)
    gib = 2**30
    return {
        "variant": variant, "batch": batch, "max_length": max_length, "steps": steps,
        "bf16_autocast": cfg.runtime.bf16_autocast, "status": result.status,
        "rss_after_imports_gib": after_imports / gib, "rss_after_load_gib": after_load / gib,
        "peak_rss_gib": measured / gib, "estimate_gib": total / gib,
        "ratio": total / measured,
        "estimate_parts_gib": {
            "weights": est.weights / gib, "lora_state": est.lora_state / gib,
            "per_sample_grads": est.per_sample_grads / gib,
            "activations": (est.activations_checkpointed if cfg.model.gradient_checkpointing
                            else est.activations) / gib,
            "overhead": est.overhead / gib},
        "load_seconds": load_seconds, "seconds_per_step": seconds / steps,
    }


def measure(config: Path, variants: tuple[str, ...], batch: int, max_length: int,
            steps: int, allocators: tuple[str, ...] = ALLOCATORS) -> dict[str, Any]:
    """Each (allocator, variant) in a fresh process; ``allocator`` ``mmap`` sets
    :data:`MMAP_ENV` (glibc then returns freed tensors to the system at once, so the RSS
    follows the live tensors), ``default`` leaves glibc as it is."""
    runs = []
    for alloc in allocators:
        env = {k: v for k, v in os.environ.items() if k not in MMAP_ENV}
        if alloc == "mmap":
            env.update(MMAP_ENV)
        for v in variants:
            print(f"[resources_check] {v}, {alloc} allocator ...", file=sys.stderr, flush=True)
            out = subprocess.run([sys.executable, "-m", "benchmarks.resources_check", "--one",
                                  v, "--config", str(config), "--batch", str(batch),
                                  "--max-length", str(max_length), "--steps", str(steps)],
                                 cwd=REPO, check=True, capture_output=True, text=True,
                                 env=env).stdout
            runs.append({"allocator": alloc, **json.loads(out.strip().splitlines()[-1])})
    return {"config": str(config), "runs": runs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.resources_check")
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--allocators", default=",".join(ALLOCATORS),
                    help="default (glibc as it is) and/or mmap (MALLOC_MMAP_THRESHOLD_)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.config, args.one, args.batch, args.max_length,
                                 args.steps)))
        return 0
    res = measure(args.config, tuple(v for v in args.variants.split(",") if v), args.batch,
                  args.max_length, args.steps,
                  tuple(a for a in args.allocators.split(",") if a))
    print("| base | allocator | peak RSS GiB | estimate GiB | estimate/measured "
          "| after imports GiB | after load GiB | s/step |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in res["runs"]:
        print(f"| {r['variant']} | {r['allocator']} | {r['peak_rss_gib']:.3f} | "
              f"{r['estimate_gib']:.3f} | {r['ratio']:.2f} | {r['rss_after_imports_gib']:.3f} | "
              f"{r['rss_after_load_gib']:.3f} | {r['seconds_per_step']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
