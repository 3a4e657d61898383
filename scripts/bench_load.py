"""Benchmark: peak memory of loading an original-layout InternVL checkpoint, at a real size.

A random bf16 checkpoint in the original `InternVLChatModel` layout (keys and config.json as
scripts/make_tiny_original.py writes them, with the published dimensions of InternVL2-1B or -2B and ~1 GB shards
plus an index) is written to `--workdir`, and converted once to an HF-native folder (`save_converted`, 1 GB
shards). Then each of these runs in a fresh process, which reports its peak RSS and the wall time of the load
alone:

  baseline         import torch, transformers and vltrain's converter; load nothing
  load_original    `vltrain.model.convert.load_original`: meta-initialised model, filled shard by shard
  naive            every shard read into one dict, every key converted (`convert_tensor`), the model built
                   normally in bf16 (`_from_config`), then `load_state_dict`: two copies at the peak
  from_pretrained  `InternVLForConditionalGeneration.from_pretrained` of the HF-native folder (transformers'
                   own loader, for reference)

"extra" is peak RSS minus the baseline's; "extra / model" divides it by the model bytes (parameters x 2). The
loads also print a fingerprint of a few weights, which must agree. The files are in the page cache when
measured (just written), so the times are not disk-bound. Children run with OMP_NUM_THREADS=1.

Memory is VmHWM (the kernel's resident high-water mark since exec): ru_maxrss is not used, Linux carries the
parent's high-water mark over fork + exec. safetensors maps shards into memory, so a weight loaded without a
copy stays file-backed and becomes resident only when read: each load is measured twice, right after loading
and after one element per 4 KiB page of every weight has been read (what the first forward pass does). The
second is the number that counts; the anon / file split at the end shows what is a copy (anon) and what is the
page cache of the shards (file, reclaimable).

    python scripts/bench_load.py --model internvl2-1b --workdir /tmp/bench_load [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import make_tiny_original as tiny  # noqa: E402
import torch  # noqa: E402

IMAGE_SIZE = 448  # InternViT-300M-448px
VISION_300M_448 = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                   "num_hidden_layers": 24}
# Published dimensions (vltrain/conf/model/<name>.yaml); the rest of each config is make_tiny_original's family.
MODELS = {
    "internvl2-1b": ("qwen2", {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                               "num_attention_heads": 14, "num_key_value_heads": 2, "max_window_layers": 24}),
    "internvl2-2b": ("internlm2", {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                                   "num_attention_heads": 16, "num_key_value_heads": 8,
                                   "max_position_embeddings": 32768}),
}
SHARD_BYTES = 1 << 30
MODES = ("baseline", "load_original", "naive", "from_pretrained")


def write_original(model: str, out: Path) -> int:
    """Write the random original-layout checkpoint; returns the number of parameters."""
    family_name, llm = MODELS[model]
    family = tiny.FAMILIES[family_name]
    tiny.IMAGE_SIZE = IMAGE_SIZE  # read at call time by chat_config and the position-embedding shape
    out.mkdir(parents=True, exist_ok=True)
    vocab = tiny.write_tokenizer(family, tiny.DEFAULT_TOKENIZERS, out)
    config = tiny.chat_config(family, vocab)
    config["vision_config"].update(VISION_300M_448)
    config["llm_config"].update(llm)
    tiny._write_json(out / "config.json", config)
    tiny._write_json(out / "generation_config.json", {"_from_model_config": True, "transformers_version": "4.37.2"})

    specs = tiny.parameter_specs(config)
    shards, used = [[]], 0
    for key, shape, _, _ in specs:
        size = 2 * torch.Size(shape).numel()
        if shards[-1] and used + size > SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append((key, shape))
        used += size
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        # values do not matter here, only sizes: small normal noise, generated directly in bf16
        tensors = {key: torch.randn(shape, dtype=torch.bfloat16).mul_(0.02) for key, shape in shard}
        tiny.save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    total = sum(torch.Size(s).numel() for _, s, _, _ in specs)
    tiny._write_json(out / "model.safetensors.index.json",
                     {"metadata": {"total_size": 2 * total}, "weight_map": weight_map})
    return total


# ---- child processes ---------------------------------------------------------------------------------------


def _memory() -> dict[str, int]:
    """VmHWM (peak resident set since exec), VmRSS, RssAnon and RssFile of this process, in bytes."""
    fields = ("VmHWM", "VmRSS", "RssAnon", "RssFile")
    lines = Path("/proc/self/status").read_text().splitlines()
    return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in lines if line.startswith(fields)}


def _touch(model) -> None:
    """Read one element per 4 KiB page of every weight: what the first forward pass does to mmap-backed ones."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        flat = tensor.detach().reshape(-1)
        flat[:: max(1, 4096 // flat.element_size())].sum()


def _tokenizer(ckpt: Path):
    from vltrain.model.tokenizer import add_internvl_tokens, load_tokenizer

    template = json.loads((ckpt / "config.json").read_text())["template"]
    tokenizer = load_tokenizer(ckpt, template=template)
    add_internvl_tokens(tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, template


def _naive(ckpt: Path, tokenizer):
    from vltrain.model import convert
    from vltrain.model.internvl import model_class

    original = json.loads((ckpt / "config.json").read_text())
    checkpoint = {}
    for file in convert.shard_files(ckpt):
        checkpoint.update(convert.read_shard(file))
    layout = convert._layout(original)
    state = {}
    for name in list(checkpoint):
        state.update(convert.convert_tensor(name, checkpoint.pop(name), layout))
    config = convert.convert_config(original, tokenizer.convert_tokens_to_ids(convert.IMAGE_CONTEXT_TOKEN))
    config._attn_implementation = "sdpa"
    model = model_class(config)._from_config(config, dtype=torch.bfloat16)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"naive load: {result}")
    return model.eval()


def child(mode: str, workdir: Path) -> None:
    """Run one measurement in this (fresh) process and print its result as one JSON line."""
    from transformers import InternVLForConditionalGeneration

    from vltrain.model.convert import load_original, save_converted

    ckpt, native = workdir / "original", workdir / "native"
    tokenizer = _tokenizer(ckpt) if mode in ("load_original", "naive", "convert") else None
    before = _memory()
    start = time.perf_counter()
    if mode == "load_original":
        model = load_original(ckpt, tokenizer[0], torch.bfloat16)
    elif mode == "naive":
        model = _naive(ckpt, tokenizer[0])
    elif mode == "from_pretrained":
        model = InternVLForConditionalGeneration.from_pretrained(native, dtype=torch.bfloat16)
    elif mode == "convert":
        save_converted(load_original(ckpt, tokenizer[0], torch.bfloat16), tokenizer[0], native, tokenizer[1],
                       max_shard_size="1GB")
        model = None
    else:
        model = None
    result = {"mode": mode, "wall": time.perf_counter() - start, "before": before, "loaded": _memory()}
    if model is not None:
        _touch(model)
        result["touched"] = _memory()
        params = dict(model.named_parameters())
        result["params"] = sum(p.numel() for p in params.values())
        result["fingerprint"] = [round(params[n].sum(dtype=torch.float32).item(), 3) for n in (
            "lm_head.weight", "model.language_model.layers.3.self_attn.k_proj.weight",
            "model.vision_tower.encoder.layer.5.attention.v_proj.bias")]
    print("RESULT " + json.dumps(result), flush=True)


def run_child(mode: str, workdir: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, "--child", mode, "--workdir", str(workdir)], env=env,
                          check=False, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{mode}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


# ---- driver ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="internvl2-1b")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_load"))
    parser.add_argument("--keep", action="store_true", help="keep (and on the next run reuse) the checkpoints")
    parser.add_argument("--child", choices=MODES + ("convert",), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.workdir)
        return 0

    workdir = args.workdir
    stamp = workdir / "model.txt"
    if not (stamp.is_file() and stamp.read_text().startswith(args.model + " ")):
        shutil.rmtree(workdir, ignore_errors=True)
        start = time.perf_counter()
        total = write_original(args.model, workdir / "original")
        print(f"wrote {args.model} original checkpoint ({total / 1e9:.3f}B params) in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        run_child("convert", workdir)
        stamp.write_text(f"{args.model} {total}\n")
    total = int(stamp.read_text().split()[1])
    model_bytes = 2 * total
    shards = sorted((workdir / "original").glob("*.safetensors"))
    print(f"{args.model}: {total / 1e9:.3f}B params, {model_bytes / 2**30:.2f} GiB bf16; {len(shards)} original "
          f"shards (largest {max(f.stat().st_size for f in shards) / 2**30:.2f} GiB); load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)

    results = {}
    for mode in MODES:
        results[mode] = run_child(mode, workdir)
        print(f"  {mode}: {json.dumps(results[mode])}", flush=True)
    prints = {mode: r["fingerprint"] for mode, r in results.items() if "fingerprint" in r}
    agree = len({json.dumps(p) for p in prints.values()}) == 1
    counts = {r["params"] for r in results.values() if "params" in r}

    gib = 2**30
    base = results["baseline"]["loaded"]["VmHWM"]
    print(f"\n{args.model}: {total / 1e9:.3f}B params, model bytes {model_bytes / gib:.2f} GiB (bf16); "
          f"baseline peak RSS (imports only) {base / gib:.2f} GiB; fingerprints agree: {agree}; "
          f"params loaded: {sorted(counts)}\n")
    print("| load | wall s | peak RSS, load GiB | peak RSS, weights touched GiB | extra GiB | extra / model "
          "| end RSS anon + file GiB |")
    print("|---|---|---|---|---|---|---|")
    for mode in MODES[1:]:
        r = results[mode]
        loaded, touched = r["loaded"]["VmHWM"], r["touched"]["VmHWM"]
        anon, file = r["touched"]["RssAnon"], r["touched"]["RssFile"]
        print(f"| {mode} | {r['wall']:.1f} | {loaded / gib:.2f} | {touched / gib:.2f} | {(touched - base) / gib:.2f} "
              f"| {(touched - base) / model_bytes:.2f} | {anon / gib:.2f} + {file / gib:.2f} |")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if agree and counts == {total} else 1


if __name__ == "__main__":
    sys.exit(main())
