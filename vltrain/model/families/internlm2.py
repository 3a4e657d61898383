"""InternLM2 / InternLM2.5 (and InternLM3 as InternVL3-9B declares it): the original class's config defaults and
its key names next to the Llama ones it converts to, as data. The fused `attention.wqkv` is split per KV group by
`vltrain.model.convert.split_grouped_qkv` and fused back by `fuse_grouped_qkv`."""

from __future__ import annotations

# InternLM2Config's class defaults (the official internlm2/configuration_internlm2.py).
DEFAULTS = {
    "vocab_size": 103168, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu", "max_position_embeddings": 2048,
    "initializer_range": 0.02, "rms_norm_eps": 1e-6, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
    "bias": True, "rope_theta": 10000.0, "rope_scaling": None,
}
# inside `model.layers.<i>.` (a trailing dot: prefix) -> inside `model.language_model.layers.<i>.`
LAYER = {"attention.wo.": "self_attn.o_proj.", "feed_forward.w1.": "mlp.gate_proj.",
         "feed_forward.w3.": "mlp.up_proj.", "feed_forward.w2.": "mlp.down_proj.",
         "attention_norm.": "input_layernorm.", "ffn_norm.": "post_attention_layernorm."}
# under `language_model.` -> native
TOP = {"model.tok_embeddings.weight": "model.language_model.embed_tokens.weight",
       "model.norm.weight": "model.language_model.norm.weight", "output.weight": "lm_head.weight"}
