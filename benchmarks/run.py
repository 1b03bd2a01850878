"""Benchmark CLI: `python benchmarks/run.py {data,train,vl_modes,serving,latency,plan,all}` or one of
{tick,fuzz,hostile,cnn,contact}; prints JSON/markdown results.

`tick` (the sensor-rate loop with the per-call model work eager and compiled, side by side; `tick diffusion flow`
for the sampling heads), `fuzz` (10,000 hostile payloads against a real server, a few minutes), `hostile` (other
clients' round trips while one sends the messages of issue 19, and the server's memory under 16 concurrent
maximum-size frames), `cnn` (the CNN reference policy, trained for several wall-clock budgets and rolled out) and
`contact` (the MuJoCo contact tasks' expert rates and costs; needs sensorvla[sim]) run only when named.

Each benchmark measures the quantities it compares side by side in one run and reports ratios, because
these machines are noisy. The README's figures are copied from this command's output.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # benchmarks import each other's set-up helpers


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str]) -> int:
    which = argv[0] if argv else "all"
    results = {}
    if which in ("data", "all"):
        results["data"] = _load("bench_data").run()
    if which in ("serving", "all"):
        results["serving"] = _load("bench_serving").run()
    if which in ("latency", "all"):
        from sensorvla.eval.latency import describe_threads, format_table
        from sensorvla.world.latency import run_suite

        # 1 and 2 threads side by side in one run (OMP_NUM_THREADS / --threads otherwise pick one)
        print(describe_threads(), "| measuring threads 1 and 2 side by side")
        rows = run_suite(iters=30, threads=(1, 2))
        print(format_table(rows, with_targets=True))
        results["latency"] = rows
    if which == "tick":
        mod = _load("bench_tick")
        results["tick"] = mod.run(tuple(argv[1:]) or ("regression",))
        print(mod.format_table(results["tick"]))
    if which == "fuzz":
        mod = _load("bench_fuzz")
        results["fuzz"] = mod.run()
        print(mod.format_table(results["fuzz"]))
    if which == "hostile":
        mod = _load("bench_hostile")
        results["hostile"] = mod.run(int(argv[1]) if len(argv) > 1 else 3)
        print(mod.format_table(results["hostile"]))
    if which in ("train", "all"):
        results["train"] = _load("bench_train").run()
    if which in ("vl_modes", "all"):
        mod = _load("bench_vl_modes")
        results["vl_modes"] = mod.run()
        print(mod.format_table(results["vl_modes"]))
    if which == "cnn":
        mod = _load("bench_cnn")
        budgets = tuple(float(b) for b in argv[1:]) or (60.0, 120.0, 240.0)
        results["cnn"] = mod.run(budgets)
        print(mod.format_table(results["cnn"]))
    if which == "contact":
        mod = _load("bench_contact")
        results["contact"] = mod.run(int(argv[1]) if len(argv) > 1 else 40)
        print(mod.format_table(results["contact"]))
    if which in ("plan", "all"):
        results["plan"] = _load("bench_plan").run()
    if not results:
        print(
            f"unknown benchmark {which!r}; choose data, train, vl_modes, serving, latency, plan, tick, fuzz, hostile, "
            "cnn, contact or all",
            file=sys.stderr,
        )
        return 2
    print(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
