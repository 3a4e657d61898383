"""Benchmark: what starting DataLoader workers from a fork server costs against forking the training process.

Each training epoch and each evaluation starts new workers (`dataloader_persistent_workers=false`, the default
that keeps resumed runs bitwise). Both ways are timed on the demo's trainer (LoRA, `--workers` workers): from
creating the loader's iterator to its first batch, `--repeats` times each, alternating. The fork server itself
starts once per process (its first start is reported separately).

    python scripts/bench/workers.py [--repeats 10] [--workers 1] [overrides...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vltrain.config import compose_config
from vltrain.data.demo import write_demo_dataset
from vltrain.train.recipe import build_trainer


def first_batch(trainer, context: str) -> float:
    trainer.args.dataloader_multiprocessing_context = context
    loader = trainer.get_train_dataloader()
    start = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    elapsed = time.perf_counter() - start
    del iterator
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--workers", type=int, default=1)
    args, overrides = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        demo = write_demo_dataset(Path(tmp) / "demo", n_train=64, n_val=0)
        cfg = compose_config(["dataset=custom", f"dataset.train=[{demo.train}]", "dataset.val_ratio=0",
                              f"trainer.dataloader_num_workers={args.workers}", *overrides],
                             run_dir=str(Path(tmp) / "run"))
        trainer = build_trainer(cfg)
        server_start = first_batch(trainer, "forkserver")
        times: dict[str, list[float]] = {"fork": [], "forkserver": []}
        for _ in range(args.repeats):
            for context in times:
                times[context].append(first_batch(trainer, context))
    print(f"fork server's first start (once per process, with its imports): {server_start * 1000:.0f} ms")
    for context, values in times.items():
        print(f"{context:>10}: first batch after {statistics.median(values) * 1000:.0f} ms (median of "
              f"{len(values)}; min {min(values) * 1000:.0f}, max {max(values) * 1000:.0f})")


if __name__ == "__main__":
    main()
