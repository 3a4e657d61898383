"""Benchmark: real tokens / computed tokens on a realistic length mix, padded, length-grouped and packed.

Lengths come from the mix of `data.py` (60% one image, 15% two or three, 10% video, 5% grounding, 10% text only;
photo-like sizes of 1 to 13 tiles, 256 tokens per tile, InternVL2's tile rules with `max_tiles` 6 split between
images as the official recipe does), the text tokenized with the InternLM2 tokenizer (or the embedded one) in the
internlm2-chat template. Nothing is decoded: the tile counts follow from the image sizes.

  padded          random batches of `--batch`, each padded to its longest record (ms-swift 2.x, official < 2.5)
  group_by_length `trainer.train_sampling_strategy=group_by_length` (HF's LengthGroupedSampler), padded
  packed        `data.packing=true`: records packed up to `data.max_length`, batches of `--batch` packs flattened
                  into one row (nothing padded; the waste is the space left in each pack's budget, counted here
                  as computed although a flattened row does not compute it)

    python scripts/bench/padding.py [--records 20000] [--batch 4] [--max-length 8192]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler

from vltrain.data.dataset import pack_groups
from vltrain.data.tiling import num_tiles
from vltrain.model.tokenizer import add_internvl_tokens, load_tokenizer
from vltrain.model.vocab import EMBEDDED_TOKENIZER

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import SHARED_INTERNLM2, SIZES, WORDS  # noqa: E402

TOKENS_PER_TILE = 256
MAX_TILES = 6
FRAMES = 8


def lengths_of_mix(n: int, tokenizer, seed: int = 0) -> list[int]:
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    def text_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    overhead = text_tokens("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           "<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n") + 1
    lengths = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.60:
            images = [rng.choice(SIZES)]
        elif kind < 0.75:
            images = rng.sample(SIZES, rng.choice((2, 3)))
        elif kind < 0.90:
            images = [rng.choice(SIZES)]  # grounding, and (below) video rows counted by frames
        else:
            images = []
        budget = max(1, MAX_TILES // max(1, len(images)))
        tiles = sum(num_tiles(w, h, budget) for w, h in images)
        markup = 3 * len(images)  # <img>, </img>, newline around each image's context tokens
        if 0.75 <= kind < 0.85:
            tiles, markup = FRAMES, 7 * FRAMES  # one tile per frame; "FrameN: <img></img>\n" each
        text = words(rng.randrange(8, 30)) + " " + words(rng.randrange(10, 60))
        rounds = 2 if rng.random() < 0.2 else 1
        if rounds == 2:
            text += " " + words(12) + " " + words(30)
        lengths.append(overhead * rounds + text_tokens(text) + tiles * TOKENS_PER_TILE + markup)
    return lengths


def efficiency(batches: list[list[int]], lengths: list[int]) -> tuple[float, int]:
    real = sum(lengths[i] for b in batches for i in b)
    computed = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return real / computed, computed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=8192)
    args = parser.parse_args(argv)
    real_tokenizer = SHARED_INTERNLM2.is_dir()
    tokenizer = load_tokenizer(SHARED_INTERNLM2 if real_tokenizer else EMBEDDED_TOKENIZER,
                               template="internlm2-chat" if real_tokenizer else "Hermes-2")
    add_internvl_tokens(tokenizer)
    lengths = [n for n in lengths_of_mix(args.records, tokenizer) if n <= args.max_length]
    n, b = len(lengths), args.batch
    print(f"{n} records ({'InternLM2' if real_tokenizer else 'tiny'} tokenizer), tokens min/median/max "
          f"{min(lengths)}/{statistics.median(lengths):g}/{max(lengths)}; batch {b}; max_length {args.max_length}")

    order = list(range(n))
    random.Random(1).shuffle(order)
    padded = [order[i:i + b] for i in range(0, n, b)]
    grouped_order = list(LengthGroupedSampler(b, lengths=lengths, generator=torch.Generator().manual_seed(1)))
    grouped = [grouped_order[i:i + b] for i in range(0, n, b)]
    packs = pack_groups(lengths, args.max_length)
    packed_real = sum(lengths)
    packed_budget = len(packs) * args.max_length

    rows = [("padded, random batches", *efficiency(padded, lengths), len(padded)),
            ("group_by_length, padded", *efficiency(grouped, lengths), len(grouped)),
            ("packed (data.packing=true)", packed_real / packed_budget, packed_budget, -(-len(packs) // b))]
    print("\n| batching | real / computed tokens | computed tokens | optimizer micro-batches |\n|---|---:|---:|---:|")
    for name, ratio, computed, steps in rows:
        print(f"| {name} | {ratio:.3f} | {computed} | {steps} |")
    print(f"\npacks: {len(packs)} for {n} records ({n / len(packs):.1f} records per pack)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
