"""Tiny random LoRA checkpoints in the on-disk formats ms-swift and the official InternVL scripts write, for the
tiny original-layout checkpoints of `make_tiny_original.py`.

Every format holds LoRA weights on the ORIGINAL module names (InternLM2's fused `wqkv`, InternViT's `attn.qkv`,
`mlp1.*`), drawn from one seeded CPU generator (lora_B non-zero, unlike a fresh peft init), and the records the
tools write next to them (sft_args.json / args.json / adapter_config.json naming the base folder):

- `swift2-list`:   ms-swift 2.2.3 peft adapter, the per-family target list (`wqkv`, `qkv_proj`, `q/k/v_proj`)
- `swift2-regex`:  ms-swift 2.3+ peft adapter, the regex `^(language_model|mlp1)(?!.*(lm_head|output|emb|wte|shared)).*`
                   (every linear of the LLM but the head, and the projector's two linears)
- `swift2-all`:    ms-swift 2.x `--lora_target_modules ALL` (every linear but `lm_head`: vision tower, projector,
                   InternLM2's `output` head too)
- `swift-backend`: ms-swift 2.x `--tuner_backend swift`: `default/` with the swift LoRAConfig and un-prefixed
                   keys carrying the adapter name
- `swift3`:        ms-swift 3.x peft adapter (regex `^(language_model(?=\\.).*\\.(...))$`, args.json)
- `official`:      the official `use_llm_lora` / `use_backbone_lora` whole-model checkpoint: every base weight
                   (`base_layer` inside peft-wrapped modules), the LoRA weights (`lora_A.default.weight`), and an
                   unfrozen projector whose weights moved
`use_dora` / `use_rslora` variants set peft's flags (DoRA magnitudes drawn around the base rows' norms).

This file imports torch and safetensors only (and make_tiny_original), so it also runs next to the official code.
Used by tests/test_adapters.py and by the golden logits of tests/data/adapters_golden.json (scripts/golden/adapters.md).

Run as:
    python scripts/make_tiny_adapters.py --base DIR --family internlm2 --format swift2-regex --out DIR
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_tiny_original as original  # noqa: E402

FORMATS = ("swift2-list", "swift2-regex", "swift2-all", "swift-backend", "swift3", "official")
SWIFT2_REGEX = r"^(language_model|mlp1)(?!.*(lm_head|output|emb|wte|shared)).*"
# ms-swift 2.2.3's per-model-type default targets (module_mapping of that release)
SWIFT2_LISTS = {"InternLM2ForCausalLM": ["wqkv"], "Phi3ForCausalLM": ["qkv_proj"],
                "Qwen2ForCausalLM": ["q_proj", "k_proj", "v_proj"], "LlamaForCausalLM": ["q_proj", "k_proj", "v_proj"]}
# ms-swift 3.x: the LLM's linear names (all but the head) in its target regex
SWIFT3_NAMES = {"InternLM2ForCausalLM": ["wqkv", "wo", "w1", "w3", "w2"],
                "Phi3ForCausalLM": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
                "Qwen2ForCausalLM": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                "LlamaForCausalLM": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
# the official wrap_llm_lora / wrap_backbone_lora targets
OFFICIAL_LLM = {"InternLM2ForCausalLM": ["attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
                                         "feed_forward.w3"],
                "Phi3ForCausalLM": ["mlp.down_proj", "mlp.gate_up_proj", "self_attn.o_proj", "self_attn.qkv_proj"],
                "Qwen2ForCausalLM": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                     "mlp.gate_proj", "mlp.down_proj", "mlp.up_proj"]}
OFFICIAL_LLM["LlamaForCausalLM"] = OFFICIAL_LLM["Qwen2ForCausalLM"]
OFFICIAL_VISION = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
MODEL_TYPES = {"internlm2": "internvl2-2b", "internlm2-vit6b-ps1": "internvl-chat-v1_5", "qwen2": "internvl2-1b",
               "phi3": "internvl2-4b", "llama": "internvl2-llama3-76b"}


def _json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _write_json(path: Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """Module path -> (out, in) of every nn.Linear of the original InternVLChatModel, in state-dict order."""
    out = {}
    for key, shape, kind, _ in original.parameter_specs(config):
        if kind == "linear" and len(shape) == 2 and key.endswith(".weight"):
            out[key.removesuffix(".weight")] = shape
    return out


def _suffix_match(name: str, targets: list[str]) -> bool:
    """peft's list matching: the full name, or a suffix after a dot."""
    return any(name == t or name.endswith("." + t) for t in targets)


def targeted(fmt: str, config: dict) -> tuple[list[str], list[str] | str]:
    """(module paths that carry LoRA, the `target_modules` the tool writes) of one format."""
    arch = config["llm_config"]["architectures"][0]
    linears = list(linear_shapes(config))
    if fmt in ("swift2-list", "swift-backend"):
        targets = list(SWIFT2_LISTS[arch])
        return [m for m in linears if _suffix_match(m, targets)], targets
    if fmt == "swift2-regex":
        return [m for m in linears if re.fullmatch(SWIFT2_REGEX, m)], SWIFT2_REGEX
    if fmt == "swift2-all":
        # find_all_linears: each linear's last name part (the last two when it is a number), never `lm_head`
        names = []
        for m in linears:
            parts = m.split(".")
            name = ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]
            if name != "lm_head" and name not in names:
                names.append(name)
        return [m for m in linears if _suffix_match(m, names)], names
    if fmt == "swift3":
        regex = rf"^(language_model(?=\.).*\.({'|'.join(SWIFT3_NAMES[arch])}))$"
        return [m for m in linears if re.fullmatch(regex, m)], regex
    if fmt == "official":
        llm = [m for m in linears if m.startswith("language_model.") and _suffix_match(m, OFFICIAL_LLM[arch])]
        vision = [m for m in linears if m.startswith("vision_model.") and _suffix_match(m, OFFICIAL_VISION)]
        return llm + vision, OFFICIAL_LLM[arch]
    raise KeyError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")


def base_state(base: Path) -> dict[str, torch.Tensor]:
    weight_map = _json(base / "model.safetensors.index.json")["weight_map"]
    shards = {name: load_file(str(base / name)) for name in dict.fromkeys(weight_map.values())}
    return {key: shards[name][key] for key, name in weight_map.items()}


def lora_weights(modules: list[str], shapes: dict, r: int, seed: int, dora: bool = False,
                 base: dict | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """module -> {lora_A (r, in), lora_B (out, r)[, lora_magnitude_vector (out,)]} in fp32: A like peft's kaiming
    init, B non-zero and small enough that the update is about a third of the base weight."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in modules:
        rows, cols = shapes[m]
        a = torch.randn(r, cols, generator=g) / math.sqrt(cols)
        b = torch.randn(rows, r, generator=g) * (0.1 / math.sqrt(r))
        out[m] = {"lora_A": a, "lora_B": b}
        if dora:
            norm = base[m + ".weight"].float().norm(dim=1)
            out[m]["lora_magnitude_vector"] = norm * (0.8 + 0.4 * torch.rand(rows, generator=g))
    return out


def _peft_config(target_modules, r: int, alpha: int, base: Path, dora: bool, rslora: bool) -> dict:
    """adapter_config.json as peft 0.12 (ms-swift 2.x's pin) writes it for a LoraConfig(task_type=CAUSAL_LM)."""
    return {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": str(base), "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layer_replication": None,
        "layers_pattern": None, "layers_to_transform": None, "loftq_config": {}, "lora_alpha": alpha,
        "lora_dropout": 0.05, "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": [],
        "peft_type": "LORA", "r": r, "rank_pattern": {}, "revision": None, "target_modules": target_modules,
        "task_type": "CAUSAL_LM", "use_dora": dora, "use_rslora": rslora,
    }


def _peft_keys(weights: dict, prefix: str = "base_model.model.", adapter: str = "") -> dict[str, torch.Tensor]:
    tag = f".{adapter}" if adapter else ""
    out = {}
    for m, parts in weights.items():
        for part, t in parts.items():
            leaf = f"{part}{tag}" if part == "lora_magnitude_vector" else f"{part}{tag}.weight"
            out[f"{prefix}{m}.{leaf}"] = t.contiguous()
    return out


def make_adapter(base: Path, family: str, fmt: str, out: Path, seed: int = 0, r: int = 8, alpha: int = 32,
                 dora: bool = False, rslora: bool = False, base_record: str | None = None) -> Path:
    """Write the LoRA checkpoint of `fmt` for the tiny original checkpoint `base` (of `family`) into `out`.
    `base_record`: the base path the records name (default: `base`)."""
    base, out = Path(base), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = _json(base / "config.json")
    shapes = linear_shapes(config)
    modules, target_modules = targeted(fmt, config)
    state = base_state(base) if (dora or fmt == "official") else None
    record = base_record or str(base)
    model_type = MODEL_TYPES[family]
    template_type = {"internlm2-chat": "internvl2", "Hermes-2": "internvl2", "phi3-chat": "internvl2-phi3"}[
        config["template"]]
    if fmt == "official":
        r, alpha = 8, 16  # use_llm_lora = use_backbone_lora = 8: alpha 2r, as the model class wraps them
        return _official(base, config, modules, shapes, state, out, seed, r)
    weights = lora_weights(modules, shapes, r, seed, dora, state)
    adapter_config = _peft_config(target_modules, r, alpha, Path(record), dora, rslora)
    if fmt == "swift-backend":
        folder = out / "default"
        folder.mkdir(exist_ok=True)
        swift = {**adapter_config, "swift_type": "LORA", "model_key_mapping": None, "use_qa_lora": False,
                 "use_merged_linear": False, "enable_lora": None, "lora_dtype": None, "lorap_lr_ratio": None,
                 "lorap_emb_lr": 1e-06}
        for key in ("peft_type", "auto_mapping", "revision", "task_type", "base_model_name_or_path"):
            swift.pop(key, None)
        _write_json(folder / "adapter_config.json", swift)
        save_file(_peft_keys(weights, prefix="", adapter="default"), str(folder / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
    else:
        _write_json(out / "adapter_config.json", adapter_config)
        save_file(_peft_keys(weights), str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    if fmt == "swift3":
        _write_json(out / "args.json", {
            "model": record, "model_type": "internvl2", "template": "internvl2", "train_type": "lora",
            "lora_rank": r, "lora_alpha": alpha, "target_modules": ["all-linear"], "use_dora": dora,
            "use_rslora": rslora, "torch_dtype": "bfloat16", "dataset": ["AI-ModelScope/coco#20000"]})
        _write_json(out / "additional_config.json", {"lora_dtype": None, "lorap_lr_ratio": None, "lorap_emb_lr": 1e-6})
    else:
        _write_json(out / "sft_args.json", {
            "model_type": model_type, "model_id_or_path": record, "model_revision": "master", "sft_type": "lora",
            "tuner_backend": "swift" if fmt == "swift-backend" else "peft", "template_type": template_type,
            "dtype": "bf16", "lora_target_modules": target_modules if isinstance(target_modules, list) else ["DEFAULT"],
            "lora_rank": r, "lora_alpha": alpha, "lora_dropout": 0.05, "use_dora": dora, "use_rslora": rslora,
            "dataset": ["coco-en-2-mini"], "max_length": 2048})
        _write_json(out / "configuration.json", {"framework": "pytorch", "task": "text-generation",
                                                 "allow_remote": True, "adapter_cfg": {"model_id_or_path": record,
                                                                                       "model_type": model_type}})
        if fmt != "swift-backend":
            _write_json(out / "additional_config.json", {"lora_dtype": None, "lorap_lr_ratio": None,
                                                         "lorap_emb_lr": 1e-6})
    return out


def _official(base: Path, config: dict, modules: list[str], shapes: dict, state: dict, out: Path, seed: int,
              r: int) -> Path:
    """The whole-model checkpoint the official trainer saves with use_llm_lora = use_backbone_lora = r and an
    unfrozen projector: the LLM wrapped as PeftModelForCausalLM (`language_model.base_model.model.`), the vision
    tower as PeftModel (`vision_model.base_model.model.`), targeted linears as `base_layer` + LoRA (`default`)."""
    weights = lora_weights(modules, shapes, r, seed)
    g = torch.Generator().manual_seed(seed + 1)
    saved = {}
    for key, tensor in state.items():
        module = key.rsplit(".", 1)[0]
        if key.startswith("mlp1.") and tensor.ndim == 2:  # the projector trained along (freeze_mlp false)
            tensor = (tensor.float() + 0.05 * tensor.float().std() * torch.randn(tensor.shape, generator=g)).to(
                tensor.dtype)
        for part, wrapped in (("language_model.", "language_model.base_model.model."),
                              ("vision_model.", "vision_model.base_model.model.")):
            if key.startswith(part):
                name = wrapped + key.removeprefix(part)
                if module in weights:
                    name = wrapped + module.removeprefix(part) + ".base_layer." + key.rsplit(".", 1)[1]
                saved[name] = tensor
                break
        else:
            saved[key] = tensor
        if module in weights and key.endswith(".weight"):
            prefix = name.rsplit(".base_layer.", 1)[0]
            for part, t in weights[module].items():
                saved[f"{prefix}.{part}.default.weight"] = t.to(tensor.dtype)
    config = dict(config, use_llm_lora=r, use_backbone_lora=r if any(m.startswith("vision_model.") for m in modules)
                  else 0)
    if not config["use_backbone_lora"]:
        raise ValueError("official checkpoints here always wrap the vision tower too")
    for f in base.iterdir():
        if f.is_file() and not f.name.startswith("model") and f.name != "config.json":
            (out / f.name).write_bytes(f.read_bytes())
    _write_json(out / "config.json", config)
    original.write_shards(saved, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="a make_tiny_original checkpoint")
    parser.add_argument("--family", choices=sorted(original.FAMILIES), required=True)
    parser.add_argument("--format", choices=FORMATS, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dora", action="store_true")
    parser.add_argument("--rslora", action="store_true")
    args = parser.parse_args(argv)
    make_adapter(args.base, args.family, args.format, args.out, args.seed, dora=args.dora, rslora=args.rslora)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
