"""``python -m benchmarks [--quick] [--json PATH] [--markdown PATH] [--only NAMES]``

Runs every benchmark (see :mod:`benchmarks`), prints the figures as Markdown tables and
writes them as JSON. Order: the memory runs first (fresh subprocesses, before this
process has loaded a model), then everything that needs Ray on one private local Ray
instance (round overhead, throughput, GPU), then the in-process ones (DP overhead,
communication, audit cost). A benchmark that fails is reported under ``errors`` and the exit code is
1; the others still run.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks import BENCHMARKS
from benchmarks.common import machine_info, private_ray, set_default_env


def _target(value: Any, target: float, label: str) -> dict[str, Any]:
    ok = value is not None and math.isfinite(value)
    return {"value": value, "target": target, "target_text": f"<= {target:g}",
            "met": (value <= target) if ok else None, "label": label}


def run(quick: bool, only: set[str], workdir: Path, gpus_per_worker: float = 0.5
        ) -> dict[str, Any]:
    set_default_env()
    t0 = time.perf_counter()
    res: dict[str, Any] = {"quick": quick, "command": " ".join(["python -m benchmarks",
                                                                 *sys.argv[1:]]),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                           "machine": machine_info(), "details": {}, "errors": {}}
    d = res["details"]

    def attempt(name: str, fn: Any) -> Any:
        if name.split(" ")[0] not in only:
            return None
        print(f"[benchmarks] {name} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        try:
            out = fn()
        except Exception as exc:  # noqa: BLE001 - reported, the others still run
            res["errors"][name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            return None
        print(f"[benchmarks] {name} done in {time.perf_counter() - t:.1f} s",
              file=sys.stderr, flush=True)
        return out

    from benchmarks import (
        audit_cost,
        communication,
        dp_overhead,
        gpu,
        memory,
        round_overhead,
        throughput,
    )

    d["memory"] = attempt("memory", lambda: memory.measure(quick))
    if only & {"round_overhead", "throughput", "gpu"}:
        with private_ray() as ray:
            live: dict[str, Any] = {}

            def harness_part() -> dict[str, Any]:
                out, live["harness"], live["plan"] = round_overhead.measure(ray, quick, workdir)
                return out

            ro = attempt("round_overhead", harness_part) if "round_overhead" in only else None
            tp: dict[str, Any] = {}
            if "throughput" in only:
                if "harness" not in live:  # throughput alone: start the tiny harness
                    _, live["harness"], live["plan"] = round_overhead.measure(ray, True,
                                                                              workdir)
                tp["updates"] = attempt("throughput (updates)", lambda: throughput
                                        .updates_per_second(live["harness"], live["plan"],
                                                            quick))
                if quick:  # tokens on the running tiny harness: no new actors
                    tp["tokens"] = attempt("throughput (tokens)", lambda: throughput
                                           .tokens_per_second(ray, quick, workdir,
                                                              harness=live["harness"],
                                                              plan=live["plan"]))
            if "harness" in live:
                live["harness"].shutdown()
            if ro is not None:
                evals = ro["harness"]["per_worker"]["mean_eval_seconds_by_worker"]
                ro["runner"] = attempt("round_overhead (runner)", lambda: round_overhead
                                       .cross_check_with_runner(quick, workdir, evals))
                d["round_overhead"] = ro
            if "throughput" in only and not quick:
                tp["tokens"] = attempt("throughput (tokens)", lambda: throughput
                                       .tokens_per_second(ray, quick, workdir))
            if "throughput" in only:
                d["throughput"] = tp
            d["gpu"] = attempt("gpu", lambda: gpu.measure(ray, quick, workdir,
                                                                gpus_per_worker))
    d["dp_overhead"] = attempt("dp_overhead", lambda: dp_overhead.measure(quick))
    d["communication"] = attempt("communication", lambda: communication.measure(quick))
    d["audit_cost"] = attempt("audit_cost", lambda: audit_cost.measure(quick, workdir))

    d = {k: v for k, v in d.items() if v is not None}
    res["details"] = d
    _headline(res, quick)
    res["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    res["total_seconds"] = time.perf_counter() - t0
    return res


def _headline(res: dict[str, Any], quick: bool) -> None:
    d = res["details"]
    nan = float("nan")
    ro = d.get("round_overhead") or {}
    runner = ro.get("runner") or {}
    mem = d.get("memory") or {}
    dp = d.get("dp_overhead") or {}
    cm = d.get("communication") or {}
    tp = d.get("throughput") or {}
    updates = (tp.get("updates") or {})
    tokens = (tp.get("tokens") or {})
    ac = d.get("audit_cost") or {}
    res["round_overhead_ratio"] = runner.get("ratio", nan)
    res["memory_ratio_10000_vs_10"] = mem.get("ratio", nan)
    res["dp_step_overhead_ratio"] = dp.get("ratio", nan)
    res["payload_overhead_fraction"] = cm.get("payload_overhead_fraction", nan)
    res["audit_cost_fraction"] = ac.get("audit_cost_fraction", nan)
    res["client_updates_per_second"] = updates.get("client_updates_per_second", {})
    res["tokens_per_second_per_worker"] = tokens.get("tokens_per_second_per_worker", {})
    res["labels"] = {
        "round_overhead_ratio": f"real runner, tiny-llama, {ro.get('clients_per_round')} "
                                "clients/round, 2 workers",
        "memory_ratio_10000_vs_10": mem.get("ratio_label", ""),
        "dp_step_overhead_ratio": f"{dp.get('label', '')}, hooks",
        "payload_overhead_fraction": "SmolLM2-135M-shaped q,v r=8 float32 update "
                                     "(PackedUpdate, pickle 5)",
        "audit_cost_fraction": ac.get("label", ""),
        "client_updates_per_second": f"{updates.get('model', '')}, per-client dispatch",
        "tokens_per_second_per_worker": tokens.get("label", ""),
    }
    lab = res["labels"]
    res["targets"] = {
        "round overhead (wall / ideal)": _target(res["round_overhead_ratio"], 1.10,
                                                 lab["round_overhead_ratio"]),
        "memory, largest vs 10 clients": _target(res["memory_ratio_10000_vs_10"], 1.25,
                                                 lab["memory_ratio_10000_vs_10"]),
        "DP-SGD step / plain step": _target(res["dp_step_overhead_ratio"], 1.5,
                                            lab["dp_step_overhead_ratio"]),
        "payload serialisation overhead": _target(res["payload_overhead_fraction"], 0.01,
                                                  lab["payload_overhead_fraction"]),
        "audit cost ((on - off) / off)": _target(res["audit_cost_fraction"], 0.20,
                                                 lab["audit_cost_fraction"]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[2])
    p.add_argument("--quick", action="store_true",
                   help="small sizes, tiny model everywhere (a smoke test, < ~60 s)")
    p.add_argument("--json", metavar="PATH", help="write all figures as JSON here")
    p.add_argument("--markdown", metavar="PATH", help="write the printed tables here too")
    p.add_argument("--only", metavar="NAMES",
                   help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    p.add_argument("--gpus-per-worker", type=float, default=0.5, metavar="G",
                   help="fractional GPU share per worker for the gpu benchmark (default 0.5: "
                        "two workers on one GPU); skipped where no GPU is visible")
    p.add_argument("--workdir", metavar="DIR",
                   help="scratch folder for run outputs (default: a temp folder)")
    args = p.parse_args(argv)
    only = set(BENCHMARKS) if not args.only else {s.strip() for s in args.only.split(",")}
    unknown = only - set(BENCHMARKS)
    if unknown:
        print(f"error: --only: unknown benchmark(s) {sorted(unknown)}; choose from "
              f"{', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="dplora-bench-") as tmp:
        res = run(args.quick, only, Path(args.workdir) if args.workdir else Path(tmp),
                  gpus_per_worker=args.gpus_per_worker)
    from benchmarks.report import format_report

    text = format_report(res)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.json:
        from dplora_ray.results import write_json_atomic

        write_json_atomic(res, args.json)
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
