"""Single-GPU bf16 training of a real-size random-weight InternVL2-1B (or 2B) with the ZeRO-2 config: the memory
plan's estimate next to the measured peak GPU memory.

    python scripts/bench/gpu_zero2.py                                   # internvl2-1b, full fine-tuning
    python scripts/bench/gpu_zero2.py --model internvl2-2b --sft lora --batch 2 --max-length 4096

Needs a CUDA GPU, deepspeed, and the model's tokenizer folder (`--tokenizer`, default ../shared/tokenizers/qwen2
for 1B, internlm2 for 2B): the weights are random (`model.init=random`), nothing is downloaded. The estimate is
printed twice: at `data.max_length` (what plan assumes: every sample that long) and at the longest sample the run
actually trained on (its tokens and tiles), which is what the measured peak should be compared with.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOKENIZERS = {"internvl2-1b": "qwen2", "internvl2-2b": "internlm2", "mini-internvl-chat-2b-v1_5": "internlm2"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="internvl2-1b")
    parser.add_argument("--sft", default="full", choices=["full", "lora"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--out", default="/tmp/vltrain_gpu_zero2")
    a = parser.parse_args()
    sys.path.insert(0, str(REPO))

    import torch

    if not torch.cuda.is_available():
        print("gpu_zero2: needs a CUDA GPU", file=sys.stderr)
        return 2
    # One process of DeepSpeed: its process group from these (what torchrun would set).
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29531"}.items():
        os.environ.setdefault(key, value)

    from vltrain.config import compose_config
    from vltrain.data.demo import write_demo_dataset
    from vltrain.train.memory import GiB, count_parameters, estimate
    from vltrain.train.recipe import build_trainer

    tokenizer = a.tokenizer or str(REPO.parent / "shared" / "tokenizers" / TOKENIZERS.get(a.model, "qwen2"))
    demo = write_demo_dataset(Path(a.out) / "demo", n_train=64, n_val=4)
    overrides = [
        f"model={a.model}", "model.init=random", f"model.tokenizer={tokenizer}", "model.dtype=bf16",
        f"sft_type={a.sft}", "parallel=zero2", "dataset=custom", f"dataset.train=[{demo.train}]",
        "dataset.val_ratio=0", f"data.max_length={a.max_length}", f"global_batch_size={a.batch}",
        f"trainer.per_device_train_batch_size={a.batch}", f"trainer.max_steps={a.steps}", "trainer.save_strategy=no",
        "trainer.logging_steps=1", "trainer.dataloader_num_workers=2", "eval.generate_samples=0",
    ]
    cfg = compose_config(overrides, run_dir=str(Path(a.out) / "run"))
    trainer = build_trainer(cfg)
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    allocated = torch.cuda.max_memory_allocated()
    reserved = torch.cuda.max_memory_reserved()

    longest = max(range(len(trainer.train_dataset)), key=lambda i: len(trainer.train_dataset[i].input_ids))
    sample = trainer.train_dataset[longest]
    tokens, tiles = len(sample.input_ids), sum(sample.tiles_per_image) or 1
    counts = count_parameters(cfg)
    at_max = estimate(cfg, counts, world_size=1, tiles=cfg.model.max_tiles + 1)
    import dataclasses

    seen = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_length=tokens))
    at_seen = estimate(seen, counts, world_size=1, tiles=tiles)
    print(f"\n{a.model} {a.sft} parallel=zero2, 1 GPU ({torch.cuda.get_device_name(0)}), bf16, batch {a.batch}, "
          f"{a.steps} steps; longest sample {tokens} tokens, {tiles} tiles")
    print(f"{'':<28}{'weights':>9}{'grads':>9}{'optim':>9}{'buffers':>9}{'acts':>9}{'total':>9}  (GiB)")
    for name, est in ((f"plan at max_length {a.max_length}", at_max), (f"plan at {tokens} tokens", at_seen)):
        print(f"{name:<28}" + "".join(f"{getattr(est, k) / GiB:>9.2f}" for k in
                                      ("weights", "gradients", "optimizer", "buffers", "activations", "total")))
    print(f"{'measured peak allocated':<28}{'':>45}{allocated / GiB:>9.2f}")
    print(f"{'measured peak reserved':<28}{'':>45}{reserved / GiB:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
