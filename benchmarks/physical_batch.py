"""Memory of a DP-SGD step against the logical and the physical batch.

``runtime.max_physical_batch_size`` splits every sampled (logical) batch into
micro-batches with gradient accumulation. This measures, on SmolLM2-135M (bf16 autocast,
LoRA r=8 on q/v, ``model.max_length`` 64), the peak resident memory of one client's
DP-SGD step at a logical batch of 16 and of 128, the latter in one pass and in passes of
16. Each configuration runs in a fresh process (``python -m benchmarks.physical_batch
--one LOGICAL PHYSICAL``); the client holds exactly LOGICAL examples and the batch size
is LOGICAL, so the Poisson rate is 1 and every step sees all of them. Reported: the peak
RSS during the step (sampled every 5 ms) minus the RSS before it, i.e. what the step
itself adds.

Target: logical 128 in passes of 16 within 1.5x the step memory of logical 16.
``python -m benchmarks.physical_batch [--json PATH]``; several minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, set_default_env

__all__ = ["CASES", "TARGET", "measure", "run_one"]

TARGET = 1.5
CASES = ((16, None), (128, None), (128, 16))


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * 4096 / 2**20


def run_one(logical: int, physical: int | None) -> dict[str, Any]:
    """One configuration in this process (call it in a fresh process)."""
    set_default_env()
    import numpy as np

    from dplora_ray.config import load_config
    from dplora_ray.federated.client import ClientJob, ClientWorker
    from dplora_ray.federated.runner import plan_run
    from dplora_ray.privacy.streams import NoiseKey

    over = ["runtime.backend=inline", "runtime.torch_threads=2", "federation.num_clients=4",
            "federation.clients_per_round=1", "federation.local_steps=1",
            f"federation.batch_size={logical}", "data.test_size=30",
            "data.max_train_examples=600", "model.max_length=64"]
    if physical is not None:
        over.append(f"runtime.max_physical_batch_size={physical}")
    cfg = load_config(REPO / "configs" / "demo.yaml", over)
    plan = plan_run(cfg)
    worker = ClientWorker(cfg, plan.data)
    start = worker.initial_state()
    state = {k: start[k] for k in worker.trainable_keys()}
    idx = np.asarray(plan.parts[0][:logical])
    job = ClientJob(client_id=0, indices=idx, seed=1, noise_multiplier=0.5,
                    noise_key=NoiseKey.generate())
    import threading

    base = _rss_mb()
    peak_box = [base]
    done = threading.Event()

    def sample() -> None:  # RSS every 5 ms while the step runs
        while not done.is_set():
            peak_box[0] = max(peak_box[0], _rss_mb())
            done.wait(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.perf_counter()
    worker.train_client(state, job)
    seconds = time.perf_counter() - t
    done.set()
    sampler.join()
    peak = max(peak_box[0], _rss_mb())
    return {"logical": logical, "physical": physical, "rss_before_mb": base,
            "peak_rss_mb": peak, "step_mb": peak - base, "seconds": seconds}


def measure() -> dict[str, Any]:
    rows = []
    for logical, physical in CASES:
        print(f"[physical_batch] logical {logical}, physical {physical} ...", file=sys.stderr)
        out = subprocess.run([sys.executable, "-m", "benchmarks.physical_batch", "--one",
                              str(logical), str(physical or 0)], cwd=REPO, check=True,
                             capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    by = {(r["logical"], r["physical"]): r for r in rows}
    ratio = by[(128, 16)]["step_mb"] / max(1e-9, by[(16, None)]["step_mb"])
    return {"rows": rows, "ratio_128_in_16s_vs_16": ratio,
            "ratio_128_one_pass_vs_16": by[(128, None)]["step_mb"]
            / max(1e-9, by[(16, None)]["step_mb"]),
            "target": TARGET, "met": ratio <= TARGET}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.physical_batch")
    ap.add_argument("--one", nargs=2, type=int, metavar=("LOGICAL", "PHYSICAL"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.one:
        logical, physical = args.one
        print(json.dumps(run_one(logical, physical or None)))
        return 0
    res = measure()
    for r in res["rows"]:
        print(f"logical {r['logical']:4d} physical {str(r['physical']):>4}: step adds "
              f"{r['step_mb']:8.1f} MB (peak {r['peak_rss_mb']:.0f} MB), {r['seconds']:.1f} s")
    print(f"logical 128 in passes of 16 vs logical 16: {res['ratio_128_in_16s_vs_16']:.2f}x "
          f"(target <= {TARGET}); in one pass: {res['ratio_128_one_pass_vs_16']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
