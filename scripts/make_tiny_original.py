"""Tiny random InternVL checkpoints in the ORIGINAL layout that OpenGVLab publishes on the hub.

One checkpoint per LLM family, in the `InternVLChatModel` (trust_remote_code) layout: an `InternVLChatConfig`
config.json written field by field as the published ones are (including the generic `PretrainedConfig` keys that
transformers 4.37 dumped into `llm_config`), bf16 weights in several safetensors shards with
`model.safetensors.index.json`, the LLM tokenizer files with the nine InternVL tokens, and generation_config.json.
Every parameter is random (norm weights, layer scales, biases and embeddings too), scaled so that activations stay
near unit size: logits are not saturated and greedy decoding does not repeat one token. The output depends only on
`seed` (torch's CPU generator) and the tokenizer files, not on transformers: this file imports torch, safetensors
and (for Phi-3's tokenizer.model) sentencepiece only, so it also runs in an old-transformers environment next to
the official code.

Used by the converter tests and by the golden logits of tests/data/convert_golden.json (scripts/golden/convert.md).
`make_int8_copy` rewrites a checkpoint with its linear weights as LLM.int8() saves them (the layout of
InternVL-Chat-V1-5-int8).

Run as:
    python scripts/make_tiny_original.py --family internlm2 --out DIR [--tokenizers ../shared/tokenizers]
    python scripts/make_tiny_original.py --all --out DIR      (one sub-folder per family)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

DEFAULT_TOKENIZERS = Path(__file__).resolve().parents[2] / "shared" / "tokenizers"

# Same strings and order as the official finetune script's add_tokens call (so the ids follow this order).
INTERNVL_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")

IMAGE_SIZE = 112   # one tile: 8x8 patches of 14 px -> 4x4 = 16 <IMG_CONTEXT> tokens after the pixel shuffle
PATCH_SIZE = 14
DOWNSAMPLE_RATIO = 0.5

# InternViT with the 300M-448px settings (layer_norm, qkv bias, no qk-norm, layer scale init 1.0), tiny sizes.
VISION_300M = {
    "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2,
    "norm_type": "layer_norm", "qk_normalization": False, "qkv_bias": True,
    "initializer_factor": 1.0, "initializer_range": 0.02,
}
# InternVisionConfig's class defaults (the 6B values): what a config.json without these keys means.
VISION_CLASS_DEFAULTS = {"norm_type": "rms_norm", "qk_normalization": True, "qkv_bias": False}
# InternViT-6B-448px-V1-5 settings (rms_norm, qk-norm over all heads, no qkv bias, layer scale init 0.1).
VISION_6B = {
    "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2,
    "norm_type": "rms_norm", "qk_normalization": True, "qkv_bias": False,
    "initializer_factor": 0.1, "initializer_range": 1e-10,
}

# InternViT-300M-448px-V2_5 (InternVL2.5 / 3 / 3.5 small sizes): the 300M settings, layer scale init 0.1.
VISION_300M_V2_5 = {**VISION_300M, "initializer_factor": 0.1}
# InternViT-6B-448px-V2_5 (InternVL2.5-26B/38B/78B, InternVL3-38B/78B, InternVL3.5-38B/241B): rms_norm and
# qk-norm written out in config.json, no qkv bias.
VISION_6B_V2_5 = {**VISION_6B, "initializer_range": 0.02}
# The MoE keys InternVL3's vision_config carries although `use_moe` is false (the tower is dense).
VISION_UNUSED_MOE = (
    ("capacity_factor", 1.2), ("eval_capacity_factor", 1.4), ("laux_allreduce", "all_nodes"),
    ("moe_coeff_ratio", 0.5), ("moe_intermediate_size", 768), ("moe_output_scale", 4.0),
    ("noisy_gate_policy", "RSample_before"), ("num_experts", 8), ("num_routed_experts", 4),
    ("num_shared_experts", 4), ("shared_expert_intermediate_size", 3072), ("use_moe", False),
    ("use_residual", True), ("use_rts", False), ("_name_or_path", "OpenGVLab/InternViT-6B-448px-V1-5"),
)
# What InternVL3.5's llm_config adds for its training code (unused at inference).
LLM_3_5_EXTRA = {"ep_size": 1, "micro_forward": False, "skip_checkpoint": False, "use_deepep": False}


@dataclass(frozen=True)
class Family:
    """One LLM family of the InternVL 1.5 / 2.0 checkpoints, shrunk."""

    imitates: str             # the published checkpoint whose config.json this one follows
    tokenizer: str            # folder under the tokenizers root
    tokenizer_files: tuple    # files of that folder the published checkpoint ships
    vision: dict              # InternVisionConfig fields
    llm: dict                 # llm_config fields (architectures and model_type included)
    template: str
    ps_version: str
    vision_omits: tuple = ()  # keys left out of vision_config, as in the published file
    tiles: int = 3            # tiles of the golden image prompt (not part of the checkpoint)
    vision_extra: tuple = ()  # (key, value) pairs the published vision_config carries besides InternVisionConfig's
    top_level: tuple = ()     # (key, value) pairs of the published top level besides InternVLChatConfig's
    code: str = "internvl_chat"   # the official code folder that runs it (internvl_chat_gpt_oss for 3.5)
    tokenizer_builder: str = ""   # a script that writes the tokenizer folder (instead of `tokenizer`'s files)


def _phi3_factors(n: int, low: float, high: float, seed: int) -> list[float]:
    """Increasing per-frequency rope factors like Phi-3's short_factor / long_factor lists."""
    g = torch.Generator().manual_seed(seed)
    values = torch.sort(torch.rand(n, generator=g, dtype=torch.float64) * (high - low) + low).values
    return [round(float(v), 4) for v in values]


INTERNLM2_AUTO_MAP = {
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
    "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
}

FAMILIES: dict[str, Family] = {
    # InternVL2-2B / -8B / Mini-InternVL-Chat-2B-V1-5: InternViT-300M + internlm2(-5) chat.
    "internlm2": Family(
        imitates="OpenGVLab/InternVL2-2B",
        tokenizer="internlm2",
        tokenizer_files=("tokenizer.model", "tokenizer_config.json"),
        vision=VISION_300M,
        llm={
            "_name_or_path": "internlm/internlm2-chat-1_8b", "architectures": ["InternLM2ForCausalLM"],
            "model_type": "internlm2", "attn_implementation": "flash_attention_2",
            "auto_map": INTERNLM2_AUTO_MAP,
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu", "bias": False,
            # small on purpose: the golden image prompt is longer, so dynamic NTK scaling is active there
            "max_position_embeddings": 48, "rope_theta": 1000000,
            "rope_scaling": {"factor": 2.0, "type": "dynamic"},
            "rms_norm_eps": 1e-05, "initializer_range": 0.02, "pretraining_tp": 1,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
        },
        template="internlm2-chat",
        ps_version="v2",
    ),
    # InternVL-Chat-V1-5: InternViT-6B-448px-V1-5 (config without norm_type / qk_normalization) + internlm2-chat-20b,
    # pixel shuffle v1.
    "internlm2-vit6b-ps1": Family(
        imitates="OpenGVLab/InternVL-Chat-V1-5",
        tokenizer="internlm2",
        tokenizer_files=("tokenizer.model", "tokenizer_config.json"),
        vision=VISION_6B,
        vision_omits=("norm_type", "qk_normalization"),
        llm={
            "_name_or_path": "internlm/internlm2-chat-20b", "architectures": ["InternLM2ForCausalLM"],
            "model_type": "internlm2", "attn_implementation": "eager",
            "auto_map": INTERNLM2_AUTO_MAP,
            # 6 query heads on 2 KV heads: groups of 3 (the 20B has 48 on 8, groups of 6)
            "hidden_size": 96, "intermediate_size": 160, "num_hidden_layers": 2,
            "num_attention_heads": 6, "num_key_value_heads": 2, "hidden_act": "silu", "bias": False,
            "max_position_embeddings": 48, "rope_theta": 1000000,
            "rope_scaling": {"factor": 3.0, "type": "dynamic"},
            "rms_norm_eps": 1e-05, "initializer_range": 0.02, "pretraining_tp": 1,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
        },
        template="internlm2-chat",
        ps_version="v1",
        tiles=2,
    ),
    # InternVL2-1B: InternViT-300M + Qwen2-0.5B-Instruct.
    "qwen2": Family(
        imitates="OpenGVLab/InternVL2-1B",
        tokenizer="qwen2",
        tokenizer_files=("vocab.json", "merges.txt", "tokenizer_config.json"),
        vision=VISION_300M,
        llm={
            "_name_or_path": "Qwen/Qwen2-0.5B-Instruct", "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2", "attn_implementation": "flash_attention_2",
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
            "max_position_embeddings": 32768, "max_window_layers": 2, "sliding_window": 32768,
            "use_sliding_window": False, "rope_theta": 1000000.0, "rope_scaling": None,
            "rms_norm_eps": 1e-06, "initializer_range": 0.02, "attention_dropout": 0.0,
            "bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": None,
        },
        template="Hermes-2",
        ps_version="v2",
    ),
    # InternVL2-4B / Mini-InternVL-Chat-4B-V1-5: InternViT-300M + Phi-3-mini-128k-instruct (legacy "su" rope).
    "phi3": Family(
        imitates="OpenGVLab/InternVL2-4B",
        tokenizer="phi3",
        tokenizer_files=("tokenizer.model", "tokenizer_config.json"),
        vision=VISION_300M,
        llm={
            "_name_or_path": "microsoft/Phi-3-mini-128k-instruct", "architectures": ["Phi3ForCausalLM"],
            "model_type": "phi3", "attn_implementation": "flash_attention_2",
            "auto_map": {
                "AutoConfig": "configuration_phi3.Phi3Config",
                "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM",
            },
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 4, "hidden_act": "silu",
            # 128k / 4k in the real model; here 1536 / 48, so the golden image prompt uses the long factors
            "max_position_embeddings": 1536, "original_max_position_embeddings": 48,
            "rope_theta": 10000.0,
            "rope_scaling": {
                "long_factor": _phi3_factors(8, 1.0, 40.0, seed=3),
                "short_factor": _phi3_factors(8, 1.0, 2.5, seed=4),
                "type": "su",
            },
            "sliding_window": 262144, "rms_norm_eps": 1e-05, "initializer_range": 0.02,
            "embd_pdrop": 0.0, "resid_pdrop": 0.0, "attention_dropout": 0.0,
            "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000,
        },
        template="phi3-chat",
        ps_version="v2",
    ),
    # InternVL2-Llama3-76B (and 40B, Yi: also LlamaForCausalLM): InternViT-6B-448px-V1-5 + Llama.
    "llama": Family(
        imitates="OpenGVLab/InternVL2-Llama3-76B",
        tokenizer="llama3",
        tokenizer_files=("tokenizer.json", "tokenizer_config.json", "LICENSE", "NOTICE"),
        vision=VISION_6B,
        llm={
            "_name_or_path": "NousResearch/Hermes-2-Theta-Llama-3-70B", "architectures": ["LlamaForCausalLM"],
            "model_type": "llama", "attn_implementation": "flash_attention_2",
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
            "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
            "max_position_embeddings": 8192, "rope_theta": 500000.0, "rope_scaling": None,
            "rms_norm_eps": 1e-05, "initializer_range": 0.02, "pretraining_tp": 1,
            "bos_token_id": 128000, "eos_token_id": 128001, "pad_token_id": None,
        },
        template="internlm2-chat",
        ps_version="v2",
        tiles=2,
    ),

    # InternVL3-1B (and InternVL2.5-1B / -4B / -38B / -78B, InternVL3-2B..-78B: Qwen2.5): InternViT-300M-448px-V2_5 +
    # Qwen2.5-0.5B-Instruct, with InternVL3's config.json quirks: unused vision MoE keys, llm eos 151643
    # (<|endoftext|>), dynamic rope x2.0, top-level system_message / image_fold null.
    "qwen2_5": Family(
        imitates="OpenGVLab/InternVL3-1B",
        tokenizer="qwen2_5",
        tokenizer_files=("vocab.json", "merges.txt", "tokenizer_config.json"),
        vision=VISION_300M_V2_5,
        vision_extra=VISION_UNUSED_MOE,
        llm={
            "_name_or_path": "Qwen/Qwen2.5-0.5B-Instruct", "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2", "attn_implementation": "flash_attention_2",
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
            # small on purpose: the golden image prompt is longer, so the dynamic rope scaling is active there
            "max_position_embeddings": 48, "max_window_layers": 2, "sliding_window": 48,
            "use_sliding_window": False, "rope_theta": 1000000.0,
            "rope_scaling": {"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"},
            "rms_norm_eps": 1e-06, "initializer_range": 0.02, "attention_dropout": 0.0,
            "bos_token_id": 151643, "eos_token_id": 151643, "pad_token_id": None,
        },
        template="internvl2_5",
        ps_version="v2",
        top_level=(("image_fold", None), ("system_message", None)),
    ),
    # InternVL2.5-26B (InternVL2.5-2B / -8B: the same LLM family on the 300M tower): InternViT-6B-448px-V2_5 (qk-norm,
    # rms_norm written out) + internlm2_5-20b-chat; the tokenizer adds BOS.
    "internlm2_5": Family(
        imitates="OpenGVLab/InternVL2_5-26B",
        tokenizer="internlm2",
        tokenizer_files=("tokenizer.model", "tokenizer_config.json"),
        vision=VISION_6B_V2_5,
        llm={
            "_name_or_path": "internlm/internlm2_5-20b-chat", "architectures": ["InternLM2ForCausalLM"],
            "model_type": "internlm2", "attn_implementation": "flash_attention_2",
            "auto_map": INTERNLM2_AUTO_MAP,
            "hidden_size": 96, "intermediate_size": 160, "num_hidden_layers": 2,
            "num_attention_heads": 6, "num_key_value_heads": 2, "hidden_act": "silu", "bias": False,
            "max_position_embeddings": 48, "rope_theta": 1000000,
            "rope_scaling": {"factor": 2.0, "type": "dynamic"},
            "rms_norm_eps": 1e-05, "initializer_range": 0.02, "pretraining_tp": 1,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
        },
        template="internvl2_5",
        ps_version="v2",
        tiles=2,
    ),
    # InternVL3.5-1B (-2B / -4B: also tied): InternViT-300M-448px-V2_5 + Qwen3-0.6B, whose lm_head is tied to the
    # embeddings (no lm_head tensor in the files); head_dim 32 != hidden / heads as in Qwen3; top-level eos / pad.
    "qwen3": Family(
        imitates="OpenGVLab/InternVL3_5-1B",
        tokenizer="qwen3",
        tokenizer_files=("vocab.json", "merges.txt", "tokenizer_config.json"),
        vision=VISION_300M_V2_5,
        llm={
            "_name_or_path": "Qwen/Qwen3-0.6B", "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
            "attn_implementation": "flash_attention_2", **LLM_3_5_EXTRA,
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "head_dim": 32,
            "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu", "attention_bias": False,
            "max_position_embeddings": 40960, "max_window_layers": 2, "sliding_window": None,
            "use_sliding_window": False, "rope_theta": 1000000, "rope_scaling": None,
            "rms_norm_eps": 1e-06, "initializer_range": 0.02, "attention_dropout": 0.0,
            "bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": None, "tie_word_embeddings": True,
        },
        template="internvl2_5",
        ps_version="v2",
        code="internvl_chat_gpt_oss",
        top_level=(("eos_token_id", 151645), ("pad_token_id", 151643)),
    ),
    # InternVL3.5-241B-A28B (30B-A3B: the same LLM family on the 300M tower): InternViT-6B-448px-V2_5 + Qwen3-MoE,
    # experts saved one module each (transformers 4.5x layout), a router per layer, untied lm_head.
    "qwen3_moe": Family(
        imitates="OpenGVLab/InternVL3_5-241B-A28B",
        tokenizer="qwen3",
        tokenizer_files=("vocab.json", "merges.txt", "tokenizer_config.json"),
        vision=VISION_6B_V2_5,
        llm={
            "_name_or_path": "Qwen/Qwen3-235B-A22B", "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe", "attn_implementation": "flash_attention_2", **LLM_3_5_EXTRA,
            # head_dim 32 != hidden / heads, as in the real model (128 vs 4096 / 64): Qwen3MoeConfig has no such field
            "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 2,
            "head_dim": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
            "attention_bias": False, "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": True,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "output_router_logits": False,
            "router_aux_loss_coef": 0.001, "max_position_embeddings": 40960, "max_window_layers": 2,
            "sliding_window": None, "use_sliding_window": False, "rope_theta": 1000000, "rope_scaling": None,
            "rms_norm_eps": 1e-06, "initializer_range": 0.02, "attention_dropout": 0.0,
            "bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": None, "tie_word_embeddings": False,
        },
        template="internvl2_5",
        ps_version="v2",
        code="internvl_chat_gpt_oss",
        top_level=(("eos_token_id", 151645), ("pad_token_id", 151643)),
        tiles=2,
    ),
    # InternVL3.5-GPT-OSS-20B-A4B-Preview: InternViT-300M-448px-V2_5 + GPT-OSS (attention sinks, sliding and full
    # attention layers alternating, fused experts with biases, yarn rope); harmony template.
    "gpt_oss": Family(
        imitates="OpenGVLab/InternVL3_5-GPT-OSS-20B-A4B-Preview",
        tokenizer="gpt_oss",
        tokenizer_files=(),
        tokenizer_builder="make_gpt_oss_tokenizer.py",
        vision=VISION_300M_V2_5,
        llm={
            "_name_or_path": "openai/gpt-oss-20b", "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
            "attn_implementation": "eager", **LLM_3_5_EXTRA,
            "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 2, "head_dim": 32,
            "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu", "attention_bias": True,
            "num_local_experts": 4, "num_experts_per_tok": 2, "experts_per_token": 2,
            "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 16,
            "output_router_logits": False, "router_aux_loss_coef": 0.9, "swiglu_limit": 7.0,
            "max_position_embeddings": 131072, "initial_context_length": 4096, "rope_theta": 150000,
            "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                             "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
            "rms_norm_eps": 1e-05, "initializer_range": 0.02, "attention_dropout": 0.0,
            "eos_token_id": 200002, "pad_token_id": 199999, "tie_word_embeddings": False,
        },
        template="internvl3_5_gpt_oss",
        ps_version="v2",
        code="internvl_chat_gpt_oss",
        top_level=(("eos_token_id", 200002), ("pad_token_id", 199999)),
        tiles=2,
    ),
}

# What transformers 4.37's PretrainedConfig.to_dict() wrote into every published llm_config next to the model's own
# fields (copied from the published InternVL2-8B config.json).
_LLM_CONFIG_COMMON = {
    "add_cross_attention": False, "bad_words_ids": None, "begin_suppress_tokens": None,
    "chunk_size_feed_forward": 0, "cross_attention_hidden_size": None, "decoder_start_token_id": None,
    "diversity_penalty": 0.0, "do_sample": False, "early_stopping": False, "encoder_no_repeat_ngram_size": 0,
    "exponential_decay_length_penalty": None, "finetuning_task": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "is_decoder": False,
    "is_encoder_decoder": False, "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "length_penalty": 1.0,
    "max_length": 20, "min_length": 0, "no_repeat_ngram_size": 0, "num_beam_groups": 1, "num_beams": 1,
    "num_return_sequences": 1, "output_attentions": False, "output_hidden_states": False, "output_scores": False,
    "prefix": None, "problem_type": None, "pruned_heads": {}, "remove_invalid_values": False,
    "repetition_penalty": 1.0, "return_dict": True, "return_dict_in_generate": False, "sep_token_id": None,
    "suppress_tokens": None, "task_specific_params": None, "temperature": 1.0, "tf_legacy_loss": False,
    "tie_encoder_decoder": False, "tie_word_embeddings": False, "tokenizer_class": None, "top_k": 50,
    "top_p": 1.0, "torch_dtype": "bfloat16", "torchscript": False, "transformers_version": "4.37.2",
    "typical_p": 1.0, "use_bfloat16": True, "use_cache": True,
}
_VISION_CONFIG_COMMON = {
    "architectures": ["InternVisionModel"], "attention_dropout": 0.0, "drop_path_rate": 0.0, "dropout": 0.0,
    "hidden_act": "gelu", "layer_norm_eps": 1e-06, "model_type": "intern_vit_6b", "num_channels": 3,
    "output_attentions": False, "output_hidden_states": False, "return_dict": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.37.2", "use_bfloat16": True, "use_flash_attn": True,
}


# ----------------------------------------------------------------------------------------------- tokenizer files

def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _token_ids(folder: Path) -> dict[str, int]:
    """Every token id that the tokenizer files of `folder` name, by content (the sentencepiece pieces excepted)."""
    ids = {}
    if (folder / "vocab.json").is_file():
        ids.update(_json(folder / "vocab.json"))
    if (folder / "tokenizer.json").is_file():
        data = _json(folder / "tokenizer.json")
        ids.update(data["model"]["vocab"])
        ids.update({t["content"]: t["id"] for t in data["added_tokens"]})
    config = _json(folder / "tokenizer_config.json")
    ids.update({t["content"]: int(i) for i, t in config.get("added_tokens_decoder", {}).items()})
    return ids


def write_tokenizer(family: Family, tokenizers_dir: Path, out_dir: Path) -> int:
    """Copy the family's tokenizer files and add the InternVL tokens as the published checkpoints have them.

    The finetune script calls `tokenizer.add_tokens(INTERNVL_TOKENS, special_tokens=True)` and saves: each token
    gets the next id, appears in `added_tokens_decoder` (special) and `additional_special_tokens` of
    tokenizer_config.json, in added_tokens.json (slow tokenizers) and in tokenizer.json's `added_tokens` (fast).
    InternLM2 checkpoints ship them already (ids 92544..92552). Returns len(tokenizer), the LLM vocab size.
    """
    if family.tokenizer_builder:
        return _build_tokenizer(family, out_dir)
    source = Path(tokenizers_dir) / family.tokenizer
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: tokenizer folder not found (give --tokenizers)")
    for name in family.tokenizer_files:
        shutil.copyfile(source / name, out_dir / name)
    ids = _token_ids(source)
    new = [t for t in INTERNVL_TOKENS if t not in ids]
    if new and len(new) != len(INTERNVL_TOKENS):
        raise ValueError(f"{source}: has only some of the InternVL tokens")
    first = max(ids.values()) + 1
    added = {token: first + i for i, token in enumerate(new)}
    entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}

    vocab_size = max(ids.values()) + 1 + len(added)
    if not added:   # InternLM2: the published folder is tokenizer.model + tokenizer_config.json, as copied
        return vocab_size

    config = _json(out_dir / "tokenizer_config.json")
    decoder = config.setdefault("added_tokens_decoder", {})
    for token, i in added.items():
        decoder[str(i)] = {"content": token, **entry}
    config["additional_special_tokens"] = list(config.get("additional_special_tokens", [])) + new
    _write_json(out_dir / "tokenizer_config.json", config)
    if "tokenizer.json" in family.tokenizer_files:
        data = _json(out_dir / "tokenizer.json")
        data["added_tokens"] += [{"id": i, "content": t, "single_word": False, "lstrip": False,
                                  "rstrip": False, "normalized": False, "special": True} for t, i in added.items()]
        (out_dir / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")),
                                              encoding="utf-8")
    else:
        # a slow tokenizer's save (transformers 4.37): the added tokens with ids beyond the base vocabulary
        base = _base_vocab_size(source)
        _write_json(out_dir / "added_tokens.json", {
            t["content"]: int(i) for i, t in sorted(decoder.items(), key=lambda x: int(x[0])) if int(i) >= base})
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if config.get(k) is not None}
    special["additional_special_tokens"] = config["additional_special_tokens"]
    _write_json(out_dir / "special_tokens_map.json", special)
    return vocab_size


def _build_tokenizer(family: Family, out_dir: Path) -> int:
    """A tokenizer folder no shared copy exists for (GPT-OSS's o200k harmony vocabulary), written by the script
    `family.tokenizer_builder` beside this one with the InternVL tokens already added; returns the LLM vocab size
    (GPT-OSS's embedding rows, which hold every tokenizer id)."""
    import importlib.util

    path = Path(__file__).resolve().parent / family.tokenizer_builder
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    module.write_gpt_oss_tokenizer(out_dir)
    return module.MODEL_VOCAB_SIZE


def _base_vocab_size(folder: Path) -> int:
    if (folder / "vocab.json").is_file():
        return len(_json(folder / "vocab.json"))
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).get_piece_size()


def token_id(ckpt_dir: Path, token: str) -> int | None:
    """The id of `token` according to the tokenizer files of a checkpoint written here (None if it has none)."""
    return _token_ids(Path(ckpt_dir)).get(token)


# ----------------------------------------------------------------------------------------------- config.json

def _vision_config(family: Family) -> dict:
    fields = {**_VISION_CONFIG_COMMON, **family.vision, **dict(family.vision_extra), "image_size": IMAGE_SIZE,
              "patch_size": PATCH_SIZE}
    return dict(sorted((k, v) for k, v in fields.items() if k not in family.vision_omits))


def _llm_config(family: Family, vocab_size: int) -> dict:
    return dict(sorted({**_LLM_CONFIG_COMMON, **family.llm, "vocab_size": vocab_size}.items()))


def chat_config(family: Family, vocab_size: int) -> dict:
    """config.json of an InternVLChatModel checkpoint, keys as the published files have them."""
    return dict(sorted({**_chat_config(family, vocab_size), **dict(family.top_level)}.items()))


def _chat_config(family: Family, vocab_size: int) -> dict:
    return {
        "_commit_hash": None,
        "architectures": ["InternVLChatModel"],
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
            "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
        },
        "downsample_ratio": DOWNSAMPLE_RATIO,
        "dynamic_image_size": True,
        "force_image_size": IMAGE_SIZE,
        "llm_config": _llm_config(family, vocab_size),
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "model_type": "internvl_chat",
        "ps_version": family.ps_version,
        "select_layer": -1,
        "template": family.template,
        "torch_dtype": "bfloat16",
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "use_thumbnail": True,
        "vision_config": _vision_config(family),
    }


# ----------------------------------------------------------------------------------------------- weights

# How each kind of tensor is drawn (see _draw): fan-in scaled weights, small biases, norm weights around 1.
_LINEAR, _BIAS, _NORM_W, _NORM_B, _EMBED, _POS, _SCALE = "linear", "bias", "norm_w", "norm_b", "embed", "pos", "ls"
_EXPERTS = "experts"  # (experts, in, out) weights used as x @ W[e]: fan-in is dim 1


def _linear(prefix: str, out: int, inp: int, bias: bool, gain: float = 1.0) -> list:
    specs = [(f"{prefix}.weight", (out, inp), _LINEAR, gain)]
    return specs + ([(f"{prefix}.bias", (out,), _BIAS, 1.0)] if bias else [])


def _norm(prefix: str, dim: int, with_bias: bool) -> list:
    return [(f"{prefix}.weight", (dim,), _NORM_W, 1.0)] + ([(f"{prefix}.bias", (dim,), _NORM_B, 1.0)]
                                                           if with_bias else [])


def _vision_specs(v: dict) -> list:
    c, mlp = v["hidden_size"], v["intermediate_size"]
    layer_norm = v["norm_type"] == "layer_norm"
    specs = [
        ("vision_model.embeddings.class_embedding", (1, 1, c), _POS, 1.0),
        ("vision_model.embeddings.position_embedding", (1, (IMAGE_SIZE // PATCH_SIZE) ** 2 + 1, c), _POS, 0.5),
        ("vision_model.embeddings.patch_embedding.weight", (c, 3, PATCH_SIZE, PATCH_SIZE), _LINEAR, 1.0),
        ("vision_model.embeddings.patch_embedding.bias", (c,), _BIAS, 1.0),
    ]
    for i in range(v["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}"
        specs += [(f"{p}.ls1", (c,), _SCALE, v["initializer_factor"]),
                  (f"{p}.ls2", (c,), _SCALE, v["initializer_factor"])]
        specs += _linear(f"{p}.attn.qkv", 3 * c, c, v["qkv_bias"])
        if v["qk_normalization"]:
            specs += _norm(f"{p}.attn.q_norm", c, False) + _norm(f"{p}.attn.k_norm", c, False)
        specs += _linear(f"{p}.attn.proj", c, c, True)
        specs += _linear(f"{p}.mlp.fc1", mlp, c, True) + _linear(f"{p}.mlp.fc2", c, mlp, True)
        specs += _norm(f"{p}.norm1", c, layer_norm) + _norm(f"{p}.norm2", c, layer_norm)
    return specs


def _decoder_layer_specs(p: str, llm: dict) -> list:
    """One decoder layer, in the module order of the original class of `llm`."""
    h, inter = llm["hidden_size"], llm["intermediate_size"]
    heads, kv = llm["num_attention_heads"], llm["num_key_value_heads"]
    d = h // heads
    arch = llm["architectures"][0]
    if arch == "InternLM2ForCausalLM":
        # wqkv rows are grouped per KV head: [q_1 .. q_G, k, v] x KV (the trap of the grouped split)
        return (_linear(f"{p}.attention.wqkv", (heads + 2 * kv) * d, h, llm["bias"])
                + _linear(f"{p}.attention.wo", h, heads * d, llm["bias"])
                + _linear(f"{p}.feed_forward.w1", inter, h, False)
                + _linear(f"{p}.feed_forward.w3", inter, h, False)
                + _linear(f"{p}.feed_forward.w2", h, inter, False)
                + _norm(f"{p}.attention_norm", h, False) + _norm(f"{p}.ffn_norm", h, False))
    if arch == "Phi3ForCausalLM":
        specs = (_linear(f"{p}.self_attn.o_proj", h, heads * d, False)
                 + _linear(f"{p}.self_attn.qkv_proj", (heads + 2 * kv) * d, h, False)
                 + _linear(f"{p}.mlp.gate_up_proj", 2 * inter, h, False)
                 + _linear(f"{p}.mlp.down_proj", h, inter, False))
    elif arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
        d = llm.get("head_dim") or d
        # with a tied LM head the layers must outweigh the token's own (small) embedding in the residual stream
        out_gain = 8.0 if llm.get("tie_word_embeddings") else 1.0
        specs = (_linear(f"{p}.self_attn.q_proj", heads * d, h, False)
                 + _linear(f"{p}.self_attn.k_proj", kv * d, h, False)
                 + _linear(f"{p}.self_attn.v_proj", kv * d, h, False)
                 + _linear(f"{p}.self_attn.o_proj", h, heads * d, False, gain=out_gain)
                 + _norm(f"{p}.self_attn.q_norm", d, False) + _norm(f"{p}.self_attn.k_norm", d, False))
        if arch == "Qwen3MoeForCausalLM":
            # router, then one MLP module per expert (transformers 4.5x's nn.ModuleList)
            moe = llm["moe_intermediate_size"]
            specs += _linear(f"{p}.mlp.gate", llm["num_experts"], h, False)
            for e in range(llm["num_experts"]):
                specs += (_linear(f"{p}.mlp.experts.{e}.gate_proj", moe, h, False)
                          + _linear(f"{p}.mlp.experts.{e}.up_proj", moe, h, False)
                          + _linear(f"{p}.mlp.experts.{e}.down_proj", h, moe, False))
        else:
            specs += (_linear(f"{p}.mlp.gate_proj", inter, h, False) + _linear(f"{p}.mlp.up_proj", inter, h, False)
                      + _linear(f"{p}.mlp.down_proj", h, inter, False, gain=out_gain))
    elif arch == "GptOssForCausalLM":
        d = llm.get("head_dim") or d
        experts = llm["num_local_experts"]
        # the attention's own parameter (one sink logit per head) comes before its sub-modules' in the state dict
        specs = ([(f"{p}.self_attn.sinks", (heads,), _POS, 1.0)]
                 + _linear(f"{p}.self_attn.q_proj", heads * d, h, True)
                 + _linear(f"{p}.self_attn.k_proj", kv * d, h, True)
                 + _linear(f"{p}.self_attn.v_proj", kv * d, h, True)
                 + _linear(f"{p}.self_attn.o_proj", h, heads * d, True)
                 + _linear(f"{p}.mlp.router", experts, h, True)
                 # fused experts stored (experts, in, out), x @ W; gate_up columns interleave gate and up
                 + [(f"{p}.mlp.experts.gate_up_proj", (experts, h, 2 * inter), _EXPERTS, 1.0),
                    (f"{p}.mlp.experts.gate_up_proj_bias", (experts, 2 * inter), _BIAS, 1.0),
                    (f"{p}.mlp.experts.down_proj", (experts, inter, h), _EXPERTS, 1.0),
                    (f"{p}.mlp.experts.down_proj_bias", (experts, h), _BIAS, 1.0)])
    else:   # Qwen2 (q/k/v bias) and Llama
        o_bias = bool(llm.get("attention_bias"))
        qkv_bias = arch == "Qwen2ForCausalLM" or o_bias
        specs = (_linear(f"{p}.self_attn.q_proj", heads * d, h, qkv_bias)
                 + _linear(f"{p}.self_attn.k_proj", kv * d, h, qkv_bias)
                 + _linear(f"{p}.self_attn.v_proj", kv * d, h, qkv_bias)
                 + _linear(f"{p}.self_attn.o_proj", h, heads * d, o_bias)
                 + _linear(f"{p}.mlp.gate_proj", inter, h, False)
                 + _linear(f"{p}.mlp.up_proj", inter, h, False)
                 + _linear(f"{p}.mlp.down_proj", h, inter, False))
    return specs + _norm(f"{p}.input_layernorm", h, False) + _norm(f"{p}.post_attention_layernorm", h, False)


def _llm_specs(llm: dict) -> list:
    h, vocab = llm["hidden_size"], llm["vocab_size"]
    internlm2 = llm["architectures"][0] == "InternLM2ForCausalLM"
    m = "language_model.model"
    # a tied embedding is the LM head too: drawn at the head's scale (std 3 / sqrt(h)), which also keeps a token's
    # own embedding from dominating the last hidden state (greedy decoding would echo the last prompt token)
    tied = bool(llm.get("tie_word_embeddings"))
    specs = [(f"{m}.tok_embeddings.weight" if internlm2 else f"{m}.embed_tokens.weight", (vocab, h), _EMBED,
              3.0 / math.sqrt(h) if tied else 1.0)]
    for i in range(llm["num_hidden_layers"]):
        specs += _decoder_layer_specs(f"{m}.layers.{i}", llm)
    specs += _norm(f"{m}.norm", h, False)
    if llm.get("tie_word_embeddings"):
        return specs  # the LM head is the embedding matrix: save_pretrained writes it once
    # lm head gain 3: logits of a few units, neither flat nor saturated
    specs += _linear("language_model.output" if internlm2 else "language_model.lm_head", vocab, h, False, gain=3.0)
    return specs


def _projector_specs(vision_hidden: int, llm_hidden: int) -> list:
    c4 = vision_hidden * int(1 / DOWNSAMPLE_RATIO) ** 2
    return (_norm("mlp1.0", c4, True) + _linear("mlp1.1", llm_hidden, c4, True)
            + _linear("mlp1.3", llm_hidden, llm_hidden, True, gain=1.5))


def parameter_specs(config: dict) -> list[tuple[str, tuple, str, float]]:
    """(key, shape, kind, scale) of every parameter, in the module order of InternVLChatModel's state dict."""
    return (_vision_specs(VISION_CLASS_DEFAULTS | config["vision_config"])
            + _llm_specs(config["llm_config"])
            + _projector_specs(config["vision_config"]["hidden_size"], config["llm_config"]["hidden_size"]))


def _draw(shape: tuple, kind: str, scale: float, g: torch.Generator) -> torch.Tensor:
    def normal(std: float) -> torch.Tensor:
        return torch.randn(shape, generator=g, dtype=torch.float32) * std

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(shape, generator=g, dtype=torch.float32) * (high - low) + low

    if kind == _LINEAR:
        fan_in = math.prod(shape[1:])
        return normal(scale / math.sqrt(fan_in))
    if kind == _EXPERTS:
        return normal(scale / math.sqrt(shape[1]))
    if kind == _BIAS:
        return normal(0.1)
    if kind == _NORM_W:
        return uniform(0.5, 1.5)
    if kind == _NORM_B:
        return normal(0.1)
    if kind == _SCALE:          # layer scale around its published init value
        return uniform(0.5, 1.5) * scale
    if kind in (_EMBED, _POS):
        return normal(scale)
    raise ValueError(kind)


def random_state_dict(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Every parameter drawn from one CPU generator seeded with `seed`, in a fixed order; stored as bf16."""
    g = torch.Generator().manual_seed(seed)
    return {key: _draw(shape, kind, scale, g).to(torch.bfloat16)
            for key, shape, kind, scale in parameter_specs(config)}


def write_shards(state: dict[str, torch.Tensor], out_dir: Path) -> list[str]:
    """`model-0000i-of-0000n.safetensors` + index, split like save_pretrained's size cap (half the total here)."""
    sizes = {k: t.numel() * t.element_size() for k, t in state.items()}
    cap = sum(sizes.values()) // 2 + 1
    shards, current, used = [], [], 0
    for key in state:
        if current and used + sizes[key] > cap:
            shards.append(current)
            current, used = [], 0
        current.append(key)
        used += sizes[key]
    shards.append(current)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, keys in zip(names, shards):
        save_file({k: state[k].contiguous() for k in keys}, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    _write_json(out_dir / "model.safetensors.index.json",
                {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map})
    return names


def state_dict_digest(ckpt_dir: Path) -> str:
    """sha256 over (key, dtype, shape, bytes) of every tensor of a sharded checkpoint, keys sorted.

    Lets a test tell a changed generator (different weights) from a converter error.
    """
    ckpt_dir = Path(ckpt_dir)
    weight_map = _json(ckpt_dir / "model.safetensors.index.json")["weight_map"]
    digest = hashlib.sha256()
    handles = {}
    for key in sorted(weight_map):
        name = weight_map[key]
        if name not in handles:
            handles[name] = safe_open(str(ckpt_dir / name), framework="pt")
        tensor = handles[name].get_tensor(key)
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def is_int8_linear(key: str, tensor: torch.Tensor) -> bool:
    """The weights bitsandbytes' `load_in_8bit` turns into int8: every nn.Linear (ViT, mlp1, LLM layers); not the
    embeddings, norms, layer scales, the patch convolution or the LM head."""
    return tensor.ndim == 2 and (".layers." in key or key.startswith("mlp1."))


def int8_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the state as an LLM.int8() save stores it, the float weights that save stands for).

    Each linear weight W becomes `<m>.weight` = round(W * 127 / absmax) as int8, `<m>.SCB` = the row absmax
    (fp32) and `<m>.weight_format` = 0 (row-major), as bitsandbytes saves InternVL-Chat-V1-5-int8; the float
    weight it stands for is int8 * SCB / 127 (fp32). Other tensors are kept as they are in both.
    """
    saved, dequantised = {}, {}
    for key, w in state.items():
        if not is_int8_linear(key, w):
            saved[key] = dequantised[key] = w
            continue
        absmax = w.float().abs().amax(dim=1).clamp(min=1e-8)
        q = torch.round(w.float() * 127 / absmax[:, None]).to(torch.int8)
        module = key.removesuffix(".weight")
        saved |= {key: q, f"{module}.SCB": absmax, f"{module}.weight_format": torch.tensor(0, dtype=torch.uint8)}
        dequantised[key] = q.float() * (absmax / 127)[:, None]
    return saved, dequantised


def make_int8_copy(src: Path, out_dir: Path) -> Path:
    """Copy the checkpoint `src` (made by `make_checkpoint`) into `out_dir` with its linear weights saved as
    LLM.int8() does (`int8_state`) and config.json naming the quantisation; return `out_dir`."""
    src, out_dir = Path(src), Path(out_dir)
    weight_map = _json(src / "model.safetensors.index.json")["weight_map"]
    shards = {name: load_file(str(src / name)) for name in dict.fromkeys(weight_map.values())}
    state = {key: shards[name][key] for key, name in weight_map.items()}  # the index's (state-dict) order
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("model"):
            shutil.copy(f, out_dir / f.name)
    config = _json(src / "config.json")
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False,
                                     "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False}
    _write_json(out_dir / "config.json", config)
    write_shards(int8_state(state)[0], out_dir)
    return out_dir


# ----------------------------------------------------------------------------------------------- entry points

def make_checkpoint(family: str, out_dir: Path, tokenizers_dir: Path, seed: int = 0) -> Path:
    """Write a tiny random original-layout InternVL checkpoint of `family` into `out_dir`; return `out_dir`."""
    if family not in FAMILIES:
        raise KeyError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    spec = FAMILIES[family]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer(spec, Path(tokenizers_dir), out_dir)
    config = chat_config(spec, vocab_size)
    _write_json(out_dir / "config.json", config)
    # what the official save_pretrained writes for InternVLChatModel (no generation fields in its config)
    _write_json(out_dir / "generation_config.json", {"_from_model_config": True, "transformers_version": "4.37.2"})
    write_shards(random_state_dict(config, seed), out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--family", choices=sorted(FAMILIES))
    which.add_argument("--all", action="store_true", help="every family, into OUT/<family>")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokenizers", type=Path, default=DEFAULT_TOKENIZERS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    targets = {name: args.out / name for name in FAMILIES} if args.all else {args.family: args.out}
    for name, out in targets.items():
        make_checkpoint(name, out, args.tokenizers, args.seed)
        size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
        print(f"{name}: {out} ({size:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
