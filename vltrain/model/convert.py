"""Original InternVL checkpoints (`InternVLChatModel`, trust_remote_code layout) -> transformers' native
`InternVLForConditionalGeneration`, loaded shard by shard, and written back as an HF-native folder.

What changes (reference: the official `modeling_internvl_chat.py`, `modeling_intern_vit.py`, `internlm2/`):
- config: `vision_config` keys absent from config.json take the ORIGINAL class defaults (InternViT-6B's:
  rms_norm, qk-norm, no qkv bias, 48 layers...), not transformers' 300M defaults; top-level
  `tie_word_embeddings` is false (InternVL never ties); `image_token_id` comes from the tokenizer;
  `select_layer` -> `vision_feature_layer`; `image_seq_length` from `force_image_size`, patch size and
  `downsample_ratio`; `ps_version` is kept (absent = "v1", the original class default).
- vision: `vision_model.*` -> `model.vision_tower.*`, fused `attn.qkv` split evenly into q/k/v (rows [Q|K|V]),
  `ls1/ls2` -> `lambda_1/lambda_2`, `norm1/norm2` -> `layernorm_before/after`; `mlp1.{0,1,3}` -> the projector.
- InternLM2 -> Llama: renames, `wqkv` split per KV group (rows [q_1..q_G, k, v] per KV head, NOT [Q|K|V]),
  `bias` -> attention bias, rope_scaling dynamic/linear -> `rope_parameters`.
- Phi-3: prefix rename; legacy `su`/`longrope`/`yarn` rope_scaling built into explicit longrope `rope_parameters`.
- Qwen2 / Qwen2.5, Llama (Yi, Llama-3), Qwen3 (q/k norm), GPT-OSS (attention sinks, router, fused experts with
  biases, sliding / full layers): prefix rename.
- Qwen3-MoE: the per-expert modules of the original layout are fused into transformers' 3D expert parameters
  (`vltrain.model.families.qwen3_moe`).
- LM head: InternVL 1.5-3 never tie it (the config class forces `tie_word_embeddings` false); InternVL3.5's takes
  it from `llm_config` (the small Qwen3 sizes tie, and their files hold no LM head).
- config.json keys the model does not use are ignored: InternVL3's vision MoE keys (`use_moe` must be false),
  InternVL3.5's top-level `eos_token_id` / `pad_token_id` and its `llm_config` training switches.
- bitsandbytes int8 checkpoints (InternVL-Chat-V1-5-int8: `weight` int8 + `SCB`) are dequantised on the way in;
  `model.load_in_8bit` quantises them again: to the same int8 values from fp32 or fp16 weights, while bf16
  rounding moves a few (about 0.05%) by one step.

Phi-3 (`phi3-chat`): the official training tokenised with the slow sentencepiece tokenizer, which puts one `▁`
after BOS; the converted folder keeps tokenizer.model for vltrain's `SlowLlamaTokenizer`, but plain
`AutoTokenizer` builds a fast tokenizer without that `▁` (every other id is the same).

Pixel shuffle v1: a `ps_version: v1` checkpoint (InternVL-Chat-V1-5 era) loads as
`vltrain.model.internvl.InternVLPsV1ForConditionalGeneration` and its converted config.json keeps
`"ps_version": "v1"`. vltrain reloads such a folder with that subclass (`vltrain.model.internvl.model_class`);
plain `transformers` loading of it runs the v2 pixel shuffle and gives wrong image features.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    GptOssConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    LlamaConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

from vltrain.config import ConfigError
from vltrain.data.templates import chat_template_jinja, get_template
from vltrain.model.families import FAMILIES, LlmFamily, family_by_native_type, intern_vit, internlm2
from vltrain.model.families.qwen3_moe import EXPERT_KEY, ExpertCollector
from vltrain.model.generation import configure_generation
from vltrain.model.geometry import original_geometry
from vltrain.model.internvl import PS_V1, model_class
from vltrain.model.original import (
    is_original_layout,
    original_top_level,
    original_vision,
)
from vltrain.model.tokenizer import IMAGE_CONTEXT_TOKEN, SlowLlamaTokenizer, single_token_id
from vltrain.progress import progress

log = logging.getLogger(__name__)


class ConversionError(ConfigError):
    """An original checkpoint that cannot be converted; the message names the file and the keys."""


INTERNLM2_DEFAULTS = internlm2.DEFAULTS
_TEXT_CONFIG = {"phi3": Phi3Config, "qwen2": Qwen2Config, "llama": LlamaConfig, "qwen3": Qwen3Config,
                "qwen3_moe": Qwen3MoeConfig, "gpt_oss": GptOssConfig}


# ---- config ------------------------------------------------------------------------------------------------


def convert_config(original: dict, image_token_id: int) -> InternVLConfig:
    """The native InternVLConfig of an original `InternVLChatConfig` dict (config.json as published)."""
    top = original_top_level(original)
    vision = original_vision(original)
    if vision.get("use_moe"):
        raise ConversionError("vision_config.use_moe: true (a mixture-of-experts vision tower) is not supported; "
                              "InternVL3's config carries the MoE keys with use_moe false")
    image_size, tokens = original_geometry(original)
    patch_size = vision["patch_size"]
    if vision["qk_normalization"] and not math.isclose(vision["layer_norm_eps"], 1e-6):
        # transformers' vision q_norm/k_norm use a fixed eps of 1e-6.
        raise ConversionError(f"vision_config.layer_norm_eps: {vision['layer_norm_eps']} with qk_normalization "
                              "is not representable (the native q/k norm uses eps 1e-6)")
    vision_config = InternVLVisionConfig(
        hidden_size=vision["hidden_size"],
        intermediate_size=vision["intermediate_size"],
        num_hidden_layers=vision["num_hidden_layers"],
        num_attention_heads=vision["num_attention_heads"],
        hidden_act=vision["hidden_act"],
        norm_type=vision["norm_type"],
        layer_norm_eps=vision["layer_norm_eps"],
        use_qk_norm=vision["qk_normalization"],
        attention_bias=vision["qkv_bias"],
        image_size=(image_size, image_size),
        patch_size=(patch_size, patch_size),
        num_channels=vision["num_channels"],
        initializer_range=vision["initializer_range"],
        layer_scale_init_value=vision["initializer_factor"],
        attention_dropout=vision["attention_dropout"],
        projection_dropout=vision["dropout"],
        use_mean_pooling=True,  # InternViT has no final norm
    )
    ratio = top["downsample_ratio"]
    if top["ps_version"] not in ("v1", "v2"):
        raise ConversionError(f"ps_version: unknown value {top['ps_version']!r} (expected 'v1' or 'v2')")
    text = text_config(original.get("llm_config") or {})
    config = InternVLConfig(
        vision_config=vision_config,
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=tokens,
        downsample_ratio=ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=top["select_layer"],
        vision_feature_select_strategy="default",
        tie_word_embeddings=text.tie_word_embeddings,  # see text_config
        ps_version=top["ps_version"],
    )
    return config


def llm_family(llm: dict) -> str:
    return llm_family_spec(llm).name


def llm_family_spec(llm: dict) -> LlmFamily:
    arch = (llm.get("architectures") or [None])[0]
    if arch not in FAMILIES:
        raise ConversionError(f"llm_config.architectures: {arch!r} is not one of {', '.join(FAMILIES)}")
    return FAMILIES[arch]


def text_config(llm: dict):
    """The transformers text config of the original `llm_config`; InternLM2 becomes Llama."""
    family = llm_family(llm)
    if family == "internlm2":
        return _internlm2_config(llm)
    cls = _TEXT_CONFIG[family]
    fields = {f.name for f in dataclasses.fields(cls)} - {"transformers_version", "architectures", "dtype"}
    kwargs = {k: v for k, v in llm.items() if k in fields}
    if llm.get("head_dim"):  # not a field of every config class (Qwen3MoeConfig), but read by its attention
        kwargs["head_dim"] = llm["head_dim"]
    # InternVL3.5's config class ties the LM head as the LLM config says (its class default when absent: false);
    # InternVL 1.5-3 force it off
    kwargs["tie_word_embeddings"] = bool(llm.get("tie_word_embeddings", False)) and FAMILIES[
        llm["architectures"][0]].tie_from_llm
    kwargs["use_cache"] = True  # fine-tuned checkpoints often store False; generation wants the cache
    if family == "phi3":
        kwargs["rope_parameters"] = _phi3_rope(llm)
        return cls(**kwargs)
    # Qwen2 / Llama: legacy rope_theta + rope_scaling are standardised by the config class itself.
    kwargs.pop("rope_parameters", None)
    for key in ("rope_theta", "rope_scaling"):
        if key in llm:
            kwargs[key] = llm[key]
    return cls.from_dict(kwargs)


def _internlm2_config(llm: dict) -> LlamaConfig:
    c = {**INTERNLM2_DEFAULTS, **{k: v for k, v in llm.items() if v is not None or k == "rope_scaling"}}
    heads = c["num_attention_heads"]
    rope = {"rope_type": "default", "rope_theta": float(c["rope_theta"])}
    if c["rope_scaling"]:
        kind = c["rope_scaling"].get("type") or c["rope_scaling"].get("rope_type")
        if kind not in ("dynamic", "linear"):
            raise ConversionError(f"llm_config.rope_scaling: type {kind!r} is not one of dynamic, linear")
        rope.update(rope_type=kind, factor=float(c["rope_scaling"]["factor"]))
    return LlamaConfig(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=c["num_key_value_heads"] or heads,
        head_dim=c["hidden_size"] // heads,
        hidden_act=c["hidden_act"],
        max_position_embeddings=c["max_position_embeddings"],
        initializer_range=c["initializer_range"],
        rms_norm_eps=c["rms_norm_eps"],
        attention_bias=c["bias"],  # wqkv and wo; InternLM2's MLP never has a bias
        mlp_bias=False,
        rope_parameters=rope,
        pad_token_id=c["pad_token_id"],
        bos_token_id=c["bos_token_id"],
        eos_token_id=c["eos_token_id"],
        tie_word_embeddings=False,
        use_cache=True,
    )


def _phi3_rope(llm: dict) -> dict:
    """Explicit `rope_parameters` for Phi-3: `Phi3Config.from_dict` rejects the legacy `su` dict."""
    theta = float(llm.get("rope_theta", 10000.0))
    scaling = llm.get("rope_scaling")
    if not scaling:
        return {"rope_type": "default", "rope_theta": theta}
    kind = scaling.get("type") or scaling.get("rope_type")
    if kind not in ("su", "longrope", "yarn"):
        raise ConversionError(f"llm_config.rope_scaling: type {kind!r} is not one of su, longrope, yarn")
    original_max = llm.get("original_max_position_embeddings", 4096)
    # factor = max / original max: the ratio the official code scales attention by (sqrt(1 + ln f / ln max0)).
    scale = llm.get("max_position_embeddings", 4096) / original_max
    rope = {"rope_type": "longrope", "rope_theta": theta, "short_factor": list(scaling["short_factor"]),
            "long_factor": list(scaling["long_factor"]), "original_max_position_embeddings": original_max,
            "factor": scale}
    if kind == "yarn":
        # The official Phi-3 "yarn" variant scales attention by 0.1 ln(s) + 1 instead of longrope's default.
        rope["attention_factor"] = 1.0 if scale <= 1.0 else 0.1 * math.log(scale) + 1.0
    return rope


# ---- weights -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """What the key conversion needs to know about the checkpoint."""

    family: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int = 0
    tied: bool = False


_VISION_LAYER, _EMBEDDINGS, _PROJECTOR = intern_vit.LAYER, intern_vit.EMBEDDINGS, intern_vit.PROJECTOR
_INTERNLM2_LAYER, _INTERNLM2_TOP = internlm2.LAYER, internlm2.TOP
# Older transformers saved rotary caches in .bin checkpoints; they are recomputed, not weights.
_RECOMPUTED = re.compile(r"rotary_emb\.(inv_freq|cos_cached|sin_cached)$")


def split_grouped_qkv(w: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
    """InternLM2's fused `wqkv` (weight ((H + 2 KV) d, hidden) or bias ((H + 2 KV) d,)) -> q (H d, ...),
    k (KV d, ...), v (KV d, ...). Rows are grouped per KV head as [q_1 .. q_G, k, v], G = H / KV (the original
    forward's `(h gs d)` rearrange), so a contiguous [Q|K|V] split would be wrong."""
    groups = num_heads // num_kv_heads
    if w.shape[0] != (num_heads + 2 * num_kv_heads) * head_dim:
        raise ConversionError(f"wqkv has {w.shape[0]} rows, expected ({num_heads} + 2 x {num_kv_heads}) x "
                              f"{head_dim}")
    rest = w.shape[1:]
    grouped = w.reshape(num_kv_heads, groups + 2, head_dim, *rest)
    q = grouped[:, :groups].reshape(num_heads * head_dim, *rest)
    k = grouped[:, groups].reshape(num_kv_heads * head_dim, *rest).clone()
    v = grouped[:, groups + 1].reshape(num_kv_heads * head_dim, *rest).clone()
    return q, k, v


def fuse_grouped_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_kv_heads: int,
                     head_dim: int) -> torch.Tensor:
    """The inverse of `split_grouped_qkv`: q, k, v -> InternLM2's `wqkv`, rows [q_1 .. q_G, k, v] per KV head."""
    groups = num_heads // num_kv_heads
    rest = q.shape[1:]
    parts = (q.reshape(num_kv_heads, groups, head_dim, *rest), k.reshape(num_kv_heads, 1, head_dim, *rest),
             v.reshape(num_kv_heads, 1, head_dim, *rest))
    return torch.cat(parts, dim=1).reshape((num_heads + 2 * num_kv_heads) * head_dim, *rest)


def _rename_by_prefix(rest: str, table: dict[str, str]) -> str | None:
    for old, new in table.items():
        if rest == old or (old.endswith(".") and rest.startswith(old)):
            return new + rest[len(old):]
    return None


def convert_tensor(name: str, tensor: torch.Tensor, layout: _Layout,
                   experts: ExpertCollector | None = None) -> list[tuple[str, torch.Tensor]] | None:
    """The native (name, tensor) pairs of one original tensor; [] for recomputed buffers (and for per-expert
    tensors `experts` holds until their layer is complete), None for an unknown key."""
    if _RECOMPUTED.search(name):
        return []
    if name.startswith("vision_model.embeddings."):
        new = _EMBEDDINGS.get(name.removeprefix("vision_model.embeddings."))
        return [(f"model.vision_tower.embeddings.{new}", tensor)] if new else None
    if m := re.fullmatch(r"vision_model\.encoder\.layers\.(\d+)\.(.+)", name):
        prefix, rest = f"model.vision_tower.encoder.layer.{m[1]}.", m[2]
        if rest in ("attn.qkv.weight", "attn.qkv.bias"):
            leaf = rest.rsplit(".", 1)[1]
            return [(f"{prefix}attention.{p}_proj.{leaf}", part.clone())
                    for p, part in zip("qkv", tensor.chunk(3, dim=0))]
        new = _rename_by_prefix(rest, _VISION_LAYER)
        return [(prefix + new, tensor)] if new else None
    if m := re.fullmatch(r"mlp1\.(\d)\.(weight|bias)", name):
        new = _PROJECTOR.get(m[1])
        return [(f"model.multi_modal_projector.{new}.{m[2]}", tensor)] if new else None
    if not name.startswith("language_model."):
        return None
    name = name.removeprefix("language_model.")
    if layout.family != "internlm2":
        if name == "lm_head.weight":
            return [(name, tensor)]
        if experts is not None and (m := EXPERT_KEY.fullmatch(name)):
            return [("model.language_model." + n, t) for n, t in experts.take(m, tensor)]
        return [("model.language_model." + name.removeprefix("model."), tensor)] if name.startswith("model.") else None
    if name in _INTERNLM2_TOP:
        return [(_INTERNLM2_TOP[name], tensor)]
    if not (m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)):
        return None
    prefix, rest = f"model.language_model.layers.{m[1]}.", m[2]
    if rest in ("attention.wqkv.weight", "attention.wqkv.bias"):
        leaf = rest.rsplit(".", 1)[1]
        q, k, v = split_grouped_qkv(tensor, layout.num_heads, layout.num_kv_heads, layout.head_dim)
        return [(f"{prefix}self_attn.{p}_proj.{leaf}", t) for p, t in zip("qkv", (q, k, v))]
    new = _rename_by_prefix(rest, _INTERNLM2_LAYER)
    return [(prefix + new, tensor)] if new else None


def convert_rows(name: str, tensor: torch.Tensor, original: dict) -> list[tuple[str, torch.Tensor]] | None:
    """`convert_tensor` of a tensor that holds the rows of the original tensor `name` (the weight itself, a LoRA B
    of shape (out, r), a DoRA magnitude (out,)), for a checkpoint of config `original` (only its `llm_config`
    architecture and head counts are read): the native (name, rows) pairs, None for a key with no native name."""
    return convert_tensor(name, tensor, _layout(original))


def _layout(original: dict) -> _Layout:
    llm = original.get("llm_config") or {}
    family = llm_family(llm)
    defaults = INTERNLM2_DEFAULTS if family == "internlm2" else {}
    hidden = llm.get("hidden_size", defaults.get("hidden_size"))
    heads = llm.get("num_attention_heads", defaults.get("num_attention_heads"))
    kv = llm.get("num_key_value_heads") or heads
    spec = FAMILIES[llm["architectures"][0]]
    return _Layout(family, heads, kv, llm.get("head_dim") or (hidden // heads if hidden and heads else 0),
                   num_experts=llm.get("num_experts", 0) if spec.experts == "per_expert" else 0,
                   tied=bool(llm.get("tie_word_embeddings", False)) and spec.tie_from_llm)


# ---- shards --------------------------------------------------------------------------------------------------


_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE = ("model.safetensors", "pytorch_model.bin")


def shard_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint folder: the shards its index names, or its single weight file."""
    for index in _INDEXES:
        if (path / index).is_file():
            weight_map = json.loads((path / index).read_text(encoding="utf-8"))["weight_map"]
            files = [path / f for f in dict.fromkeys(weight_map.values())]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise ConversionError(f"{path / index}: shards missing from the folder: {', '.join(absent)}")
            return files
    for single in _SINGLE:
        if (path / single).is_file():
            return [path / single]
    raise ConversionError(f"{path}: no weights ({' / '.join(_INDEXES + _SINGLE)})")


def read_shard(file: Path) -> dict[str, torch.Tensor]:
    """All tensors of one shard, on CPU. `.bin` files are read with weights_only (no pickled code runs). A file that
    cannot be read (truncated, corrupt, pickled objects other than tensors) is a ConversionError naming it."""
    from safetensors import SafetensorError

    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(file, device="cpu")
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a legacy (pre-zipfile) .bin cannot be memory-mapped
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ConversionError(f"{file}: not a torch weight file, or it holds pickled objects besides tensors "
                              "(.bin files are read with torch.load(weights_only=True))") from None
    except (OSError, RuntimeError, SafetensorError) as e:
        raise ConversionError(f"{file}: cannot read the weights ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None


def dequantize_int8(shard: dict[str, torch.Tensor], carry: dict[str, torch.Tensor],
                    dtype: torch.dtype = torch.float32) -> None:
    """Turn bitsandbytes int8 weights (`<m>.weight` int8 + `<m>.SCB` row absmax, the InternVL-Chat-V1-5-int8
    layout) back into float weights in place: W = int8 * SCB / 127 per output row (computed in fp32, stored in
    `dtype`), the values the int8 layer computes with. Re-quantising an fp32 or fp16 row gives the same int8
    values (bf16 keeps 8 significant bits: a few values land one step off). A weight whose SCB sits in another
    shard waits in `carry` (and vice versa)."""
    for name in [n for n in shard if n.endswith(".weight_format")]:
        # bitsandbytes' layout tag: 0 = row-major; 1-3 = the col32 / col_turing / col_ampere GPU tile layouts of
        # its early versions, which today's bitsandbytes refuses as well
        if (layout := int(shard.pop(name))) != 0:
            raise ConversionError(f"{name}: int8 weights in bitsandbytes' GPU tile layout {layout}; only the "
                                  "row-major layout (0) converts")
    pool = {**carry, **{n: shard.pop(n) for n in list(shard) if n.endswith(".SCB")
                        or (n.endswith(".weight") and shard[n].dtype == torch.int8)}}
    carry.clear()
    for name, tensor in pool.items():
        if name.endswith(".SCB"):
            weight = name.removesuffix(".SCB") + ".weight"
            if weight not in pool:
                carry[name] = tensor
            continue
        scale = pool.get(name.removesuffix(".weight") + ".SCB")
        if scale is None:
            carry[name] = tensor
        else:
            shard[name] = (tensor.float() * (scale.float() / 127.0).unsqueeze(1)).to(dtype)


def _convert_shard(file: Path, layout: _Layout, unknown: list[str], int8_carry: dict[str, torch.Tensor],
                   dtype: torch.dtype, experts: ExpertCollector | None = None) -> dict[str, torch.Tensor]:
    """The native tensors of one shard; original keys that map to nothing are appended to `unknown`."""
    shard = read_shard(file)
    try:
        dequantize_int8(shard, int8_carry, dtype)
    except ConversionError as e:
        raise ConversionError(f"{file}: {e}") from None
    converted: dict[str, torch.Tensor] = {}
    for name in list(shard):
        try:
            pairs = convert_tensor(name, shard.pop(name), layout, experts)
        except ValueError as e:
            raise ConversionError(f"{file}: {e}") from None
        if pairs is None:
            unknown.append(f"{name} ({file.name})")
        else:
            converted.update(pairs)
    return converted


def load_original(path: Path, tokenizer, dtype: torch.dtype,
                  attn_impl: str = "sdpa") -> InternVLForConditionalGeneration:
    """Load an original-layout checkpoint folder into the native class (or its ps-v1 subclass), in `dtype`.

    The model is built with its parameters on the meta device; each shard is read, converted and its tensors
    assigned one by one, then dropped, so peak memory is about one model plus one shard (an int8 shard counts
    with its weights dequantised to `dtype`). Keys the checkpoint lacks or that the model does not have are
    reported together after the last shard, as one ConversionError.
    """
    from accelerate import init_empty_weights

    path = Path(path)
    if not is_original_layout(path):
        raise ConversionError(f"{path / 'config.json'}: not an original InternVL (InternVLChatModel) config")
    original = json.loads((path / "config.json").read_text(encoding="utf-8"))
    image_token_id = single_token_id(tokenizer, IMAGE_CONTEXT_TOKEN)
    if image_token_id is None:
        raise ConversionError(f"{path}: the tokenizer has no {IMAGE_CONTEXT_TOKEN} token (add_internvl_tokens)")
    try:
        config = convert_config(original, image_token_id)
    except ConversionError as e:
        raise ConversionError(f"{path / 'config.json'}: {e}") from None
    vocab = config.text_config.vocab_size
    if len(tokenizer) > vocab:
        raise ConversionError(f"{path / 'config.json'}: llm_config.vocab_size {vocab} < {len(tokenizer)} tokens "
                              "in the tokenizer")
    from vltrain.model.load import attention_implementations

    config._attn_implementation = attention_implementations(config.text_config, attn_impl)
    config.dtype = dtype

    with init_empty_weights(include_buffers=False):  # parameters on meta; rotary buffers computed for real
        model = model_class(config)(config)
    if config.tie_word_embeddings:
        model.tie_weights()  # lm_head shares the embedding parameter: one target, loaded once
    targets = dict(model.named_parameters()) | {n: b for n, b in model.named_buffers() if n in model.state_dict()}
    pending = set(targets)
    unknown: list[str] = []
    unexpected: list[str] = []
    mismatched: list[str] = []
    layout = _layout(original)
    int8_carry: dict[str, torch.Tensor] = {}
    experts = ExpertCollector(layout.num_experts) if layout.num_experts else None
    tied_head = None  # a tied model's lm_head tensor, when the files hold one: it must equal the embeddings
    for file in progress(shard_files(path), desc=f"converting {path.name}", unit="shards"):
        converted = _convert_shard(file, layout, unknown, int8_carry, dtype, experts)
        for name in list(converted):  # popped: each source tensor is freed once its `dtype` copy is in place
            tensor = converted.pop(name)
            if layout.tied and name == "lm_head.weight":
                tied_head = tensor.to(dtype)
            elif name not in targets:
                unexpected.append(name)
            elif tensor.shape != targets[name].shape:
                mismatched.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(targets[name].shape)}")
            else:
                _assign(model, name, tensor.to(dtype).contiguous())
                pending.discard(name)
        tensor = None  # nothing of this shard outlives its loop (peak: one model + one shard)
    unknown += [f"{name} (int8 tensor without its {'weight' if name.endswith('.SCB') else 'SCB'})"
                for name in int8_carry]
    unknown += [f"{group} (incomplete experts)" for group in (experts.incomplete() if experts else [])]
    problems = [f"{len(names)} {what}: {_listing(names)}" for what, names in (
        ("missing", sorted(pending)), ("unknown original keys", unknown),
        ("converted keys the model lacks", unexpected), ("shape mismatches", mismatched)) if names]
    if problems:
        raise ConversionError(f"{path}: cannot convert ({llm_family(original.get('llm_config') or {})} LLM): "
                              + " | ".join(problems))
    if layout.tied:
        model.tie_weights()  # the assigned embedding replaced the parameter lm_head shared
        embeddings = model.get_input_embeddings().weight
        if model.lm_head.weight is not embeddings:
            raise ConversionError(f"{path}: tie_word_embeddings is set but the LM head could not be tied")
        if tied_head is not None and not torch.equal(tied_head, embeddings.data):
            raise ConversionError(f"{path}: llm_config.tie_word_embeddings is true but the checkpoint's "
                                  "language_model.lm_head.weight differs from the embeddings")
    model.eval()
    return model


def _listing(names: list[str], limit: int = 20) -> str:
    more = f"; ... and {len(names) - limit} more" if len(names) > limit else ""
    return "; ".join(names[:limit]) + more


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        module._buffers[leaf] = tensor


# ---- saving --------------------------------------------------------------------------------------------------

# Named tokens transformers' InternVL processor reads from the tokenizer (`tokenizer.context_image_token`...).
# Its `video_token` is not written: it would add a token the embeddings have no row for.
NAMED_IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                      "context_image_token": IMAGE_CONTEXT_TOKEN}


def save_converted(model, tokenizer, dst: Path, template: str, max_shard_size: str = "5GB") -> None:
    """Write an HF-native folder that plain `InternVLForConditionalGeneration.from_pretrained(dst)` and
    `AutoTokenizer.from_pretrained(dst)` load without remote code: sharded safetensors, config.json (its
    `text_config.architectures` naming the LLM class),
    generation_config.json (as `configure_generation` sets it: greedy, eos = the template's stop token) and the
    tokenizer with the template as its Jinja chat_template and the InternVL image tokens named.
    """
    dst = Path(dst)
    if isinstance(tokenizer, SlowLlamaTokenizer):
        log.warning(
            "%s: template %s trains on the slow sentencepiece tokenizer's ids. Load the tokenizer with vltrain "
            "(vltrain.model.tokenizer.load_tokenizer(dst, template=%r)); plain transformers AutoTokenizer builds a "
            "fast one from tokenizer.model whose ids lack the '▁' (id %s) the slow one puts after BOS.",
            dst, template, template, tokenizer.convert_tokens_to_ids("▁"))
    if getattr(model.config, "ps_version", "v2") == PS_V1:
        log.warning(
            "%s: ps_version v1 checkpoint. Load it with vltrain (vltrain.model.internvl.model_class), which "
            "uses the v1 pixel shuffle; plain transformers InternVLForConditionalGeneration.from_pretrained "
            "would run the v2 pixel shuffle (token grid transposed) and give wrong image features.", dst)
    dst.mkdir(parents=True, exist_ok=True)
    family = family_by_native_type(model.config.text_config.model_type)
    if family is not None:  # as the published -hf folders name it (and LMDeploy reads it to pick a backend)
        model.config.text_config.architectures = [family.native_architecture]
    configure_generation(model, tokenizer, template)  # what vltrain's own loading sets
    model.save_pretrained(dst, max_shard_size=max_shard_size)

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = chat_template_jinja(template, tokenizer)
    tokenizer.save_pretrained(dst)
    config_file = dst / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config.pop("auto_map", None)  # InternLM2's remote tokenizer class: tokenizer.json gives the same ids
    if not _is_transformers_class(config.get("tokenizer_class")):
        config["tokenizer_class"] = "TokenizersBackend"
    config.update(NAMED_IMAGE_TOKENS)
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _is_transformers_class(name: str | None) -> bool:
    import transformers

    return bool(name) and hasattr(transformers, name)


def convert_checkpoint(src: Path, dst: Path, dtype: torch.dtype | None = None, template: str | None = None,
                       tokenizer_path: Path | None = None, max_shard_size: str = "5GB") -> Path:
    """Convert the original checkpoint folder `src` into the HF-native folder `dst` (see `save_converted`).

    `dtype` None keeps the checkpoint's (config `torch_dtype`, bf16 when absent); `template` None reads the
    checkpoint's config `template` field; `tokenizer_path` None uses the tokenizer in `src`.
    """
    from vltrain.model.tokenizer import add_internvl_tokens, load_tokenizer

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ConversionError(f"{src}: no such folder")
    if not is_original_layout(src):
        raise ConversionError(f"{src}: not an original InternVL checkpoint folder (config.json with "
                              "model_type internvl_chat)")
    original = json.loads((src / "config.json").read_text(encoding="utf-8"))
    template = template or original.get("template")
    if not template:
        raise ConversionError(f"{src / 'config.json'}: template: absent; pass template=<name>")
    try:
        get_template(template)
    except ValueError as e:
        raise ConversionError(f"{src / 'config.json'}: template: {e}") from None
    if dtype is None:
        stored = original.get("torch_dtype") or original.get("dtype") or "bfloat16"
        dtype = getattr(torch, str(stored).removeprefix("torch."))
    tokenizer = load_tokenizer(tokenizer_path or src, template=template)
    add_internvl_tokens(tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_original(src, tokenizer, dtype)
    save_converted(model, tokenizer, dst, template, max_shard_size=max_shard_size)
    return dst
