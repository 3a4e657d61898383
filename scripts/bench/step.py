"""Benchmark: what vltrain adds around the model's forward and backward, and how long the trainer waits for data.

The demo's training (random InternVL, 480 demo rows, batch 4, LoRA as the demo runs it; `data.encode` as
configured, default `datasets`) runs `--steps` optimizer steps under vltrain's Trainer; then a bare PyTorch loop
does the same forward, backward, gradient clipping and AdamW step on the same model, the batches the Trainer ran
in its order (collated and normalised in memory beforehand) and the same thread count. Steps after the first
`--warmup` are timed. `--size small` widens and deepens the demo's model (~0.6 s steps on one core).

  step overhead   vltrain seconds per step / bare loop seconds per step (goal <= 1.05)
  data wait       share of vltrain's step time spent waiting for the next batch from the DataLoader
                  (goal <= 2% with the default workers)
  normalisation   share of vltrain's step time spent normalising the batch's uint8 tiles on the trainer's device

    python scripts/bench/step.py [--steps 60] [--workers 1] [--size demo|small] [--train-only] [overrides...]

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

from vltrain.config import compose_config
from vltrain.data.collator import model_inputs
from vltrain.model.load import load_model
from vltrain.model.tuning import apply_sft
from vltrain.train.recipe import build_trainer


class TimedLoader:
    """A DataLoader whose `next()` is timed (the trainer's wait for a batch); the records of each batch are kept
    (`records`) for the bare loop to run the same batches."""

    def __init__(self, loader, waits: list[float], records: list[list[int]]):
        self.loader, self.waits, self.records = loader, waits, records

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
            self.records.append([int(i) for i in batch["record_index"]])
            yield batch


# `--size small`: the demo's model with wider and deeper towers (random weights), for a step of ~0.6 s on one core,
# closer to the share the fixed per-step costs have at real sizes
SMALL = ["model.arch.vision.hidden_size=256", "model.arch.vision.intermediate_size=1024",
         "model.arch.vision.num_hidden_layers=4", "model.arch.llm.hidden_size=512",
         "model.arch.llm.intermediate_size=1536", "model.arch.llm.num_hidden_layers=6",
         "model.arch.llm.num_attention_heads=8", "model.arch.llm.num_key_value_heads=4"]


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


def vltrain_steps(cfg, warmup: int) -> tuple[list[float], list[float], list[float], object]:
    """(seconds of each step, seconds waited for its batch, seconds normalising its tiles, trainer)."""
    from transformers import TrainerCallback

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    trainer = build_trainer(cfg)
    trainer.add_callback(Stamp())
    normalising: list[float] = []
    prepare = trainer._prepare_inputs

    def timed_prepare(inputs):  # where the tiles are normalised, on the trainer's device
        start = time.perf_counter()
        out = prepare(inputs)
        normalising.append(time.perf_counter() - start)
        return out

    trainer._prepare_inputs = timed_prepare
    waits: list[float] = []
    trainer.batch_records = []
    make_loader = trainer.get_train_dataloader
    trainer.get_train_dataloader = lambda: TimedLoader(make_loader(), waits, trainer.batch_records)
    trainer.train()
    steps = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:])]
    accumulation = trainer.args.gradient_accumulation_steps
    per_step = [[sum(v[i:i + accumulation]) for i in range(0, len(v), accumulation)][warmup + 1:warmup + 1 + len(steps)]
                for v in (waits, normalising)]
    return steps, per_step[0], per_step[1], trainer


def bare_steps(cfg, trainer, warmup: int, steps: int) -> list[float]:
    """The same forward, backward, clipping and AdamW step, in a plain loop over batches collated and normalised
    beforehand (in memory: the data work is not in its steps)."""
    args = trainer.args
    model = apply_sft(load_model(cfg.model, trainer.processing_class, dtype=torch.float32, seed=args.seed),
                      cfg.sft_type)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.weight_decay, fused="fused" in str(args.optim))
    dataset, collate = trainer.train_dataset, trainer.data_collator
    accumulation = args.gradient_accumulation_steps
    # the trainer's batches, in its order, ready for the model: tiles normalised, collator-only keys dropped
    batches = [model_inputs(trainer._prepare_inputs(collate([dataset[i] for i in records])))
               for records in trainer.batch_records[:(warmup + steps + 1) * accumulation]]
    stamps = []
    for step in range(warmup + steps + 1):
        for micro in range(accumulation):
            loss = model(**batches[step * accumulation + micro]).loss / accumulation
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
    parser.add_argument("--size", choices=["demo", "small"], default="demo",
                        help="the demo's tiny model, or `small` (wider, deeper: ~0.6 s steps)")
    parser.add_argument("--data", type=Path, help="folder for the demo rows and the encode cache (kept; default: "
                                                  "a temporary folder)")
    parser.add_argument("overrides", nargs="*", help="extra config overrides, e.g. data.encode=lazy")
    args = parser.parse_args(argv)
    import logging

    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        overrides = (SMALL if args.size == "small" else []) + args.overrides
        cfg = config(folder, args.data or folder, args.warmup + args.steps + 1, args.workers, overrides)
        # gradient accumulation 1: one batch per step, so the data wait and the step are measured on one batch
        cfg.trainer["gradient_accumulation_steps"] = 1
        steps, waits, normalising, trainer = vltrain_steps(cfg, args.warmup)
        vl = sum(steps) / len(steps)
        if args.train_only:
            print(f"steps/s {1 / vl:.3f} torch_threads {torch.get_num_threads()}")
            return 0
        threads = torch.get_num_threads()
        bare = bare_steps(cfg, trainer, args.warmup, args.steps)
        plain = sum(bare) / len(bare)
    print(f"load average: {os.getloadavg()[0]:.2f} (cores: {os.cpu_count()}); torch threads {threads}; "
          f"workers {args.workers}; batch {cfg.trainer.get('per_device_train_batch_size')}; "
          f"{len(steps)} timed steps; model {args.size}; overrides {args.overrides or '-'}")
    print("\n| loop | s/step | steps/s | ratio |\n|---|---:|---:|---:|")
    print(f"| bare PyTorch (same model, batches, optimizer) | {plain:.4f} | {1 / plain:.2f} | 1.00 |")
    print(f"| vltrain (HF Trainer + vltrain's hooks, data from the workers) | {vl:.4f} | {1 / vl:.2f} | "
          f"{vl / plain:.3f} |")
    print(f"\ndata wait: {sum(waits):.3f} s of {sum(steps):.3f} s = {100 * sum(waits) / sum(steps):.2f}% of the step "
          f"time (max single wait {max(waits) * 1000:.1f} ms)")
    print(f"tile normalisation in the step (the trainer's device): {sum(normalising):.3f} s = "
          f"{100 * sum(normalising) / sum(steps):.2f}% of the step time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
