"""Benchmark: what vltrain adds around the model's forward and backward, and how long the trainer waits for data.

The demo's training (tiny random InternVL, 480 demo rows, batch 4, LoRA as the demo runs it; `data.encode` as
configured, default `datasets`) runs `--steps` optimizer steps under vltrain's Trainer; then a bare PyTorch loop
does the same forward, backward, gradient clipping and AdamW step on the same model, the same batches (collated
in memory beforehand) and the same thread count. Steps after the first `--warmup` are timed.

  step overhead   vltrain seconds per step / bare loop seconds per step (goal <= 1.05)
  data wait       share of vltrain's step time spent waiting for the next batch from the DataLoader
                  (goal <= 2% with the default workers)

    python scripts/bench/step.py [--steps 60] [--workers 1] [--train-only]

`--train-only` runs only vltrain's training and prints `steps/s` (used by `contention.py`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from vltrain.cli import compose_config
from vltrain.model.load import load_model
from vltrain.model.tuning import apply_sft
from vltrain.train.recipe import build_trainer


class TimedLoader:
    """A DataLoader whose `next()` is timed (the trainer's wait for a batch)."""

    def __init__(self, loader, waits: list[float]):
        self.loader, self.waits = loader, waits

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __iter__(self):
        iterator = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.waits.append(time.perf_counter() - start)
            yield batch


def config(folder: Path, data: Path, steps: int, workers: int, extra: list[str]):
    """The demo's training config (tiny model, demo recipe) on `data`'s demo rows, caches under `data`."""
    from vltrain.data.demo import write_demo_dataset

    demo = write_demo_dataset(data / "demo", n_train=480, n_val=20)
    return compose_config([
        f"dataset.demo_root={data / 'demo'}", f"dataset.train=[{demo.train}]", f"dataset.val=[{demo.val}]",
        f"data.encode_cache={data / 'encoded'}",
        "trainer.eval_strategy=no", "trainer.save_strategy=no", "trainer.eval_on_start=false",
        f"trainer.max_steps={steps}", "trainer.logging_steps=1000", "trainer.logging_first_step=false",
        f"trainer.dataloader_num_workers={workers}", "trainer.report_to=[]", *extra,
    ], run_dir=str(folder / "run"))


def vltrain_steps(cfg, warmup: int) -> tuple[list[float], list[float], object]:
    """(seconds of each step, seconds waited for each batch, trainer)."""
    from transformers import TrainerCallback

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    trainer = build_trainer(cfg)
    trainer.add_callback(Stamp())
    waits: list[float] = []
    make_loader = trainer.get_train_dataloader
    trainer.get_train_dataloader = lambda: TimedLoader(make_loader(), waits)
    trainer.train()
    steps = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:])]
    accumulation = trainer.args.gradient_accumulation_steps
    batch_waits = [sum(waits[i:i + accumulation]) for i in range(0, len(waits), accumulation)]
    return steps, batch_waits[warmup + 1:warmup + 1 + len(steps)], trainer


def bare_steps(cfg, trainer, warmup: int, steps: int) -> list[float]:
    """The same forward, backward, clipping and AdamW step, in a plain loop over batches collated beforehand."""
    args = trainer.args
    model = apply_sft(load_model(cfg.model, trainer.processing_class, dtype=torch.float32, seed=args.seed),
                      cfg.sft_type)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.weight_decay)
    dataset, collate = trainer.train_dataset, trainer.data_collator
    size, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    batches = [collate([dataset[(i * size + j) % len(dataset)] for j in range(size)])
               for i in range((warmup + steps + 1) * accumulation)]
    stamps = []
    for step in range(warmup + steps + 1):
        for micro in range(accumulation):
            batch = {k: v for k, v in batches[step * accumulation + micro].items() if k != "tiles_per_sample"}
            loss = model(**batch).loss / accumulation
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workers", type=int, default=1, help="trainer.dataloader_num_workers (demo default: 1)")
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--data", type=Path, help="folder for the demo rows and the encode cache (kept; default: "
                                                  "a temporary folder)")
    parser.add_argument("overrides", nargs="*", help="extra config overrides, e.g. data.encode=lazy")
    args = parser.parse_args(argv)
    import logging

    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cfg = config(folder, args.data or folder, args.warmup + args.steps + 1, args.workers, args.overrides)
        # gradient accumulation 1: one batch per step, so the data wait and the step are measured on one batch
        cfg.trainer["gradient_accumulation_steps"] = 1
        steps, waits, trainer = vltrain_steps(cfg, args.warmup)
        vl = sum(steps) / len(steps)
        if args.train_only:
            print(f"steps/s {1 / vl:.3f} torch_threads {torch.get_num_threads()}")
            return 0
        threads = torch.get_num_threads()
        bare = bare_steps(cfg, trainer, args.warmup, args.steps)
        plain = sum(bare) / len(bare)
    print(f"load average: {os.getloadavg()[0]:.2f} (cores: {os.cpu_count()}); torch threads {threads}; "
          f"workers {args.workers}; batch {cfg.trainer.get('per_device_train_batch_size')}; "
          f"{len(steps)} timed steps; overrides {args.overrides or '-'}")
    print("\n| loop | s/step | steps/s | ratio |\n|---|---:|---:|---:|")
    print(f"| bare PyTorch (same model, batches, optimizer) | {plain:.4f} | {1 / plain:.2f} | 1.00 |")
    print(f"| vltrain (HF Trainer + vltrain's hooks, data from the workers) | {vl:.4f} | {1 / vl:.2f} | "
          f"{vl / plain:.3f} |")
    print(f"\ndata wait: {sum(waits):.3f} s of {sum(steps):.3f} s = {100 * sum(waits) / sum(steps):.2f}% of the step "
          f"time (max single wait {max(waits) * 1000:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
