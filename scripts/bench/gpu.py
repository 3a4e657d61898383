"""GPU benchmark: tokens/s, MFU and peak memory of real-size random-weight InternVL2 training steps.

Cases (each: gradient checkpointing on, bf16, AdamW, sdpa or flash-attention 2 when `flash_attn` imports):
  internvl2-1b full fine-tuning, packed and padded
  internvl2-2b full fine-tuning, packed and padded
  internvl2-8b LoRA (base weights bf16), packed, 4096 tokens per step
The model is built from its `vltrain/conf/model/<name>.yaml` architecture with random weights directly on the
GPU (no download). Records are synthetic with the length mix of `padding.py` (1-6 tiles of 256 tokens, text of
tens of tokens): packed, every step is one row of up to `--tokens` tokens (`data.packing`: position ids restart
per record); padded, a batch of records of about the same total is padded to its longest.

MFU = model FLOPs / (step time x the measured bf16 matmul rate of this GPU). Model FLOPs per step:
6 x params x tokens for every trained matrix (LLM over all text and image tokens, ViT over 1025 patches per tile),
4 x params x tokens for frozen matrices that still pass gradients (LoRA's base), plus causal attention
(6 x layers x hidden x sum of squared record lengths, x 1.5 for backward), per record. Recomputation by gradient
checkpointing is not counted (the usual MFU convention).

    bash scripts/bench/gpu.sh            # or: python scripts/bench/gpu.py [--cases 2b-packed,...]
    python scripts/bench/gpu.py --smoke  # the tiny model on CPU: checks the script, measures nothing useful
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from vltrain.config import SftConfig, compose_config
from vltrain.data.collator import collate, collate_packed, model_inputs
from vltrain.data.dataset import pack_groups
from vltrain.data.encode import IGNORE_INDEX, Sample
from vltrain.model.load import internvl_config
from vltrain.model.tuning import apply_sft

CASES = {  # name: (model, sft, packed)
    "1b-packed": ("internvl2-1b", "full", True),
    "1b-padded": ("internvl2-1b", "full", False),
    "2b-packed": ("internvl2-2b", "full", True),
    "2b-padded": ("internvl2-2b", "full", False),
    "8b-lora-packed": ("internvl2-8b", "lora", True),
}


def matmul_rate(device, dtype=torch.bfloat16, n: int = 8192, iters: int = 20) -> float:
    """Measured dense matmul FLOP/s of this device in `dtype`."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n ** 3 * iters / (time.perf_counter() - start)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(name: str, device, dtype, attn: str, smoke: bool):
    cfg = compose_config([f"model={name}"] if not smoke else [])
    if "vocab_size" in cfg.model.arch.get("llm", {}):
        config = internvl_config(cfg.model.arch, attn_impl=attn)
    else:  # the tiny model takes its vocabulary from the embedded tokenizer
        from vltrain.model.tokenizer import IMAGE_CONTEXT_TOKEN
        from vltrain.model.vocab import load_tokenizer_for

        tokenizer = load_tokenizer_for(cfg.model)
        config = internvl_config(cfg.model.arch, vocab_size=len(tokenizer), attn_impl=attn,
                                 image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT_TOKEN))
    config.text_config.use_cache = False
    torch.manual_seed(0)
    with torch.device(device):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            from transformers import InternVLForConditionalGeneration

            model = InternVLForConditionalGeneration(config)
        finally:
            torch.set_default_dtype(previous)
    return model, config


def records(config, tokens: int, n: int, seed: int = 0) -> list[Sample]:
    """Synthetic samples: 10% text only, else 1-6 tiles; text of 20-120 tokens around the image block."""
    rng = random.Random(seed)
    per_tile = config.image_seq_length
    tile = config.vision_config.image_size[0]
    vocab = config.text_config.vocab_size
    out = []
    for _ in range(n):
        tiles = 0 if rng.random() < 0.1 else rng.choice((1, 2, 3, 5, 5, 6, 6, 6, 7))
        text = rng.randrange(20, 120)
        ids = [rng.randrange(1000, vocab - 100) for _ in range(text + tiles * per_tile)]
        ids[2:2 + tiles * per_tile] = [config.image_token_id] * (tiles * per_tile)
        labels = [IGNORE_INDEX] * (2 + tiles * per_tile + text // 2) + ids[2 + tiles * per_tile + text // 2:]
        pixels = torch.randint(0, 256, (tiles, 3, tile, tile), dtype=torch.uint8) if tiles else None
        out.append(Sample(torch.tensor(ids[:tokens]), torch.tensor(labels[:tokens]), pixels,
                          [tiles] if tiles else []))
    return out


def batches(samples: list[Sample], tokens: int, packed: bool, pad_id: int) -> list[dict]:
    if packed:
        groups = pack_groups([len(s.input_ids) for s in samples], tokens)
        return [collate_packed([samples[i] for i in g]) for g in groups]
    out, batch = [], []
    for s in samples:  # about `tokens` per padded batch
        if batch and (len(batch) + 1) * max(len(x.input_ids) for x in [*batch, s]) > tokens:
            out.append(collate(batch, pad_id))
            batch = []
        batch.append(s)
    return out


def model_flops(model, config, batch, trained: dict[str, bool]) -> float:
    """Model FLOPs of one training step on `batch` (see the module docstring)."""
    tiles = 0 if batch.get("pixel_values") is None else batch["pixel_values"].shape[0]
    patches = tiles * (1 + (config.vision_config.image_size[0] // config.vision_config.patch_size[0]) ** 2)
    if "position_ids" in batch:
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
        lengths = [b - a for a, b in zip(starts, starts[1:])]
    else:
        lengths = batch["attention_mask"].sum(1).tolist()
    text_tokens = sum(lengths)
    flops = 0.0
    for part, n_tokens in (("language_model", text_tokens), ("vision_tower", patches),
                           ("multi_modal_projector", tiles * config.image_seq_length)):
        params = sum(p.numel() for n, p in model.named_parameters() if f".{part}." in f".{n}" and p.ndim == 2
                     and "embed_tokens" not in n)
        flops += (6 if trained[part] else 4) * params * n_tokens
    head = config.text_config.vocab_size * config.text_config.hidden_size
    flops += (6 if trained["language_model"] else 4) * head * text_tokens  # the LM head
    t, v = config.text_config, config.vision_config
    flops += 6 * t.num_hidden_layers * t.hidden_size * sum(n * n for n in lengths)  # causal: half of 12
    flops += 12 * v.num_hidden_layers * v.hidden_size * tiles * (patches // max(tiles, 1)) ** 2
    return flops


def run_case(name: str, args, device, rate: float) -> dict:
    model_name, sft, packed = CASES[name] if not args.smoke else ("tiny", CASES[name][1], CASES[name][2])
    attn = "flash_attention_2" if importlib.util.find_spec("flash_attn") and device.type == "cuda" else "sdpa"
    dtype = torch.bfloat16 if sft == "lora" else torch.float32  # full: fp32 master weights, bf16 autocast
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, config = build(model_name, device, dtype, attn, args.smoke)
    model = apply_sft(model, SftConfig(name=sft))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    trained = {part: any(p.requires_grad for n, p in model.named_parameters() if f".{part}." in f".{n}")
               for part in ("language_model", "vision_tower", "multi_modal_projector")}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    samples = records(config, args.tokens, args.records)
    steps = batches(samples, args.tokens, packed, pad_id=0)[: args.warmup + args.steps]
    times, flops, tokens = [], 0.0, 0
    for i, batch in enumerate(steps):
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in model_inputs(batch).items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16 if sft == "lora" else torch.float32)
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            flops += model_flops(model, config, batch, trained)
            tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    seconds = sum(times)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    del model, optimizer
    return {"case": name, "model": model_name, "sft": sft, "packed": packed, "attn": attn, "steps": len(times),
            "tokens/s": tokens / seconds, "mfu": flops / seconds / rate, "peak GiB": peak,
            "s/step": seconds / len(times)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per step (pack budget / padded batch)")
    parser.add_argument("--records", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the script only")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        args.tokens, args.records, args.warmup, args.steps = 512, 20, 1, 2
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    rate = matmul_rate(device, n=8192 if device.type == "cuda" else 512, iters=20 if device.type == "cuda" else 2)
    print(f"device {name}; torch {torch.__version__}; measured bf16 matmul rate {rate / 1e12:.1f} TFLOP/s; "
          f"flash_attn {'yes' if importlib.util.find_spec('flash_attn') else 'no'}", flush=True)
    print("\n| case | attention | s/step | tokens/s | MFU | peak GiB |\n|---|---|---:|---:|---:|---:|", flush=True)
    for case in args.cases.split(","):
        try:
            r = run_case(case, args, device, rate)
        except torch.OutOfMemoryError as e:
            print(f"| {case} | - | out of memory: {str(e).splitlines()[0][:80]} | | | |", flush=True)
            continue
        print(f"| {case} | {r['attn']} | {r['s/step']:.3f} | {r['tokens/s']:.0f} | {100 * r['mfu']:.1f}% | "
              f"{r['peak GiB']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
