"""The LLM families of the original InternVL checkpoints, as data: which original `llm_config.architectures`
class each one is, the native (transformers) text config and causal-LM class it becomes, whether its LM head may be
tied, and how its weights map between the two layouts. `vltrain.model.convert` (original -> native) and
`vltrain.model.export` (native -> original) look a family up here by its original class.

Families whose tensors only change prefix (`language_model.model.*` <-> `model.language_model.*`: Qwen2 / 2.5,
Llama, Phi-3, Qwen3, GPT-OSS) need nothing else; the modules beside this one hold the rest as data and the few
functions it needs: `internlm2` (its renames and config defaults; the grouped `wqkv` split), `qwen3_moe`
(per-expert modules <-> fused 3D experts) and `intern_vit` (the vision tower and the projector).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LlmFamily:
    """One LLM family of the original layout."""

    name: str
    """Short name (`internlm2`, `qwen2`, ...): the converter's and the error messages' word for it."""
    architecture: str
    """The original class in `llm_config.architectures`."""
    native_type: str
    """`model_type` of the transformers text config it converts to (InternLM2 runs as Llama)."""
    native_architecture: str
    """The transformers causal-LM class, written into an HF-native folder's `text_config.architectures`."""
    tie_from_llm: bool = False
    """The official config class takes `tie_word_embeddings` from `llm_config` (InternVL3.5's
    internvl_chat_gpt_oss code); InternVL 1.5-3's class forces False for every size."""
    experts: str | None = None
    """How the original layout stores MoE experts: `per_expert` (one MLP module each, transformers 4.5x's Qwen3-MoE:
    fused on the way in), `fused` (3D parameters in the native layout already: GPT-OSS), None (dense)."""
    llm_config_keys: tuple[str, ...] = ()
    """Keys of the native text config written back into `llm_config` besides the common ones."""


_QWEN3_KEYS = ("head_dim", "attention_bias", "attention_dropout", "max_window_layers", "use_sliding_window",
               "sliding_window")

FAMILIES: dict[str, LlmFamily] = {f.architecture: f for f in (
    LlmFamily("internlm2", "InternLM2ForCausalLM", "llama", "LlamaForCausalLM"),
    LlmFamily("phi3", "Phi3ForCausalLM", "phi3", "Phi3ForCausalLM"),
    LlmFamily("qwen2", "Qwen2ForCausalLM", "qwen2", "Qwen2ForCausalLM"),
    LlmFamily("llama", "LlamaForCausalLM", "llama", "LlamaForCausalLM"),
    LlmFamily("qwen3", "Qwen3ForCausalLM", "qwen3", "Qwen3ForCausalLM", tie_from_llm=True,
              llm_config_keys=_QWEN3_KEYS),
    LlmFamily("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3_moe", "Qwen3MoeForCausalLM", tie_from_llm=True,
              experts="per_expert",
              llm_config_keys=_QWEN3_KEYS + ("moe_intermediate_size", "num_experts", "num_experts_per_tok",
                                             "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers",
                                             "output_router_logits", "router_aux_loss_coef")),
    LlmFamily("gpt_oss", "GptOssForCausalLM", "gpt_oss", "GptOssForCausalLM", tie_from_llm=True, experts="fused",
              llm_config_keys=("head_dim", "attention_bias", "attention_dropout", "num_local_experts",
                               "num_experts_per_tok", "layer_types", "sliding_window", "swiglu_limit",
                               "output_router_logits", "router_aux_loss_coef")),
)}
"""Original LLM class -> family."""


def family_of(architecture: str | None) -> LlmFamily | None:
    return FAMILIES.get(architecture or "")


def family_by_native_type(model_type: str) -> LlmFamily | None:
    """The family a native text config type comes from when nothing else says (Llama: Llama, not InternLM2)."""
    for family in FAMILIES.values():
        if family.native_type == model_type and family.name != "internlm2":
            return family
    return None
