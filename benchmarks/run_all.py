"""Run every benchmark script in turn (what `make bench` calls); each prints a table and writes JSON.

Run: .venv/bin/python benchmarks/run_all.py [--quick] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = ["extraction", "cav", "artifact_strength", "correction", "divergence", "spuriosity",
           "colored_digits", "biased_mnist", "fmd_scale", "robustness", "spray_seeds",
           "image_scale", "cuda_check", "scale_out"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="pass --quick to every script")
    parser.add_argument("--only", nargs="*", choices=SCRIPTS)
    args = parser.parse_args(argv)
    failed = []
    start = time.perf_counter()
    for name in args.only or SCRIPTS:
        path = os.path.join(HERE, f"{name}.py")
        if not os.path.exists(path):
            print(f"== {name}: not present, skipped")
            continue
        print(f"\n== {name}", flush=True)
        t0 = time.perf_counter()
        cmd = [sys.executable, path] + (["--quick"] if args.quick else [])
        rc = subprocess.call(cmd, cwd=HERE)
        print(f"== {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {time.perf_counter() - t0:.0f} s",
              flush=True)
        if rc:
            failed.append(name)
    print(f"\nAll benchmarks: {time.perf_counter() - start:.0f} s; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
