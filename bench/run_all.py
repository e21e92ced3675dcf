"""Run every benchmark, then regenerate bench/README.md's tables (what `make bench` runs).

    python bench/run_all.py            # full run: 13 min on the 2-core dev VM (+~3 min to build the scale models once)
    python bench/run_all.py --quick    # small settings, no scale bench: 2 min on a quiet 2-core VM
    python bench/run_all.py --only train generate

Benchmarks report, they never assert: a failing contender is logged and the
others still run; the exit status is 1 only when a whole bench script failed.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback

from common import load_average, log

BENCHES = ("train", "generate", "serve", "scale")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small settings, skips the Qwen2-1.5B scale bench")
    ap.add_argument("--only", nargs="*", choices=BENCHES, default=list(BENCHES))
    a = ap.parse_args(argv)
    import bench_generate
    import bench_scale
    import bench_serve
    import bench_train
    import make_table

    mods = {"train": bench_train, "generate": bench_generate, "serve": bench_serve, "scale": bench_scale}
    la = load_average()
    log(f"load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} (timings are only meaningful on a quiet machine)")
    failed = []
    t0 = time.perf_counter()
    for name in a.only:
        t = time.perf_counter()
        log(f"=== bench {name}{' --quick' if a.quick else ''}")
        try:
            mods[name].main(["--quick"] if a.quick else [])
        except Exception:
            traceback.print_exc()
            failed.append(name)
        log(f"=== bench {name}: {time.perf_counter() - t:.0f} s")
    make_table.main([])
    log(f"all benches: {time.perf_counter() - t0:.0f} s{'; FAILED: ' + ', '.join(failed) if failed else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
