"""Benchmark: the demo's training speed while one other single-threaded process keeps a core busy, against idle.

Runs `step.py --train-only` (the demo's tiny-model training, one data worker) four times in fresh processes:
idle and with one competing busy process, each with vltrain's thread budget (torch's intra-op threads on the
cores the data workers leave free, `vltrain.speed.share_cores`) and with torch's default of one thread
per core (`OMP_NUM_THREADS=<cores>`, what the demo did before). Goal: with the competitor, at least the fair share
of the cores (>= 0.5x idle on 2 cores).

    python scripts/bench/contention.py [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

STEP = Path(__file__).with_name("step.py")
BUSY = "import time\nend = time.time() + 600\nwhile time.time() < end: pass\n"


def steps_per_second(steps: int, threads: int | None, data: Path) -> float:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, str(STEP), "--train-only", "--steps", str(steps), "--data", str(data)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    match = re.search(r"steps/s ([\d.]+)", done.stdout)
    if not match:
        raise SystemExit(f"step.py failed:\n{done.stderr[-3000:]}")
    return float(match.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"load average before: {os.getloadavg()[0]:.2f} (cores: {cores})")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:  # demo rows and encode cache shared by the four runs
        steps_per_second(2, None, Path(tmp))  # writes them, untimed
        for label, threads in (("vltrain thread budget", None), (f"torch default ({cores} threads)", cores)):
            idle = steps_per_second(args.steps, threads, Path(tmp))
            busy = subprocess.Popen([sys.executable, "-c", BUSY])
            try:
                contended = steps_per_second(args.steps, threads, Path(tmp))
            finally:
                busy.kill()
                busy.wait()
            results[label] = (idle, contended)
    print("\n| threads | idle steps/s | with 1 busy process | ratio | fair share |\n|---|---:|---:|---:|---:|")
    for label, (idle, contended) in results.items():
        print(f"| {label} | {idle:.2f} | {contended:.2f} | {contended / idle:.2f} | {(cores - 1) / cores:.2f} |")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
