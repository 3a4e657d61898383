"""What trains: LoRA adapters or full fine-tuning with parts frozen by role (vision / projector / llm).

The parts of InternVLForConditionalGeneration are named here once, as data; LoRA targets and freezing both
read them. LoRA's default targets every linear layer of the LLM (not the LM head) and of the projector, never
the vision tower (ms-swift 2.3+'s default for all InternVL types). In an MoE LLM that is attention and any dense or
shared-expert MLP: transformers 5 keeps the experts as fused 3-D parameters and the routers as plain parameters,
which no linear-layer target reaches; `lora_experts` adds the experts.
"""

from __future__ import annotations

import re
import warnings

import torch
from peft import LoraConfig, get_peft_model

from vltrain.config import ConfigError, SftConfig

# peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` alias each time it wraps or loads a
# model, and transformers then warns on every run about code the user does not own. The value peft gets is
# right; only this one warning, attributed to transformers' modeling code, is silenced.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning,
                        module=r"transformers\.modeling_utils")

# Module-name prefixes of each part, in the native class.
PARTS: dict[str, tuple[str, ...]] = {
    "vision": ("model.vision_tower",),
    "projector": ("model.multi_modal_projector",),
    "llm": ("model.language_model", "lm_head"),
}
LORA_EXCLUDED = r"model\.vision_tower\..*"
"""Modules `all-linear` would reach that the default LoRA leaves alone (peft matches it against full names)."""
EXPERT_WEIGHTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
"""The fused expert weights of transformers 5's MoE layers (Qwen3-MoE: (experts, out, in); GPT-OSS: (experts, in,
out)), 3-D nn.Parameters that no `target_modules` reaches: `sft_type.lora_experts` adapts them through peft's
`target_parameters`."""


def part_of(name: str) -> str:
    for part, prefixes in PARTS.items():
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return part
    raise KeyError(f"parameter {name} belongs to no known part")


def lora_config(cfg: SftConfig) -> LoraConfig:
    """The LoRA settings of `cfg`. `lora_targets: default` is every linear layer of the LLM and the projector:
    peft's `all-linear` (which leaves out the LM head) with the vision tower excluded."""
    default = cfg.lora_targets == "default"
    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules="all-linear" if default else cfg.lora_targets,
                      exclude_modules=LORA_EXCLUDED if default else None, task_type="CAUSAL_LM",
                      target_parameters=EXPERT_WEIGHTS if cfg.lora_experts else None)


def apply_sft(model: torch.nn.Module, cfg: SftConfig) -> torch.nn.Module:
    """Return the model to train: a PeftModel for LoRA (continuing `cfg.init_adapter` when set), or the model with
    frozen parts for full."""
    if cfg.name == "lora":
        if cfg.lora_experts and not any(n.endswith(tuple(EXPERT_WEIGHTS)) for n, _ in model.named_parameters()):
            raise ConfigError("sft_type.lora_experts: this model's LLM has no fused expert weights "
                              f"({', '.join(EXPERT_WEIGHTS)}); it applies to Qwen3-MoE and GPT-OSS LLMs")
        for p in model.parameters():
            p.requires_grad_(False)
        if cfg.init_adapter:
            from vltrain.model.adapters import start_from

            return start_from(model, cfg.init_adapter)
        return get_peft_model(model, lora_config(cfg))
    frozen = {part for part, flag in (("vision", cfg.freeze_vision), ("llm", cfg.freeze_llm),
                                      ("projector", cfg.freeze_projector)) if flag}
    for name, p in model.named_parameters():
        p.requires_grad_(part_of(name) not in frozen)
    return model


def trainable_parts(model: torch.nn.Module) -> dict[str, int]:
    """Trainable parameters per part (`vision`, `projector`, `llm`; LoRA adapters count for the part they adapt),
    for the model or its PeftModel."""
    per_part: dict[str, int] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            part = part_of(_base_name(name))
            per_part[part] = per_part.get(part, 0) + p.numel()
    return per_part


def trainable_summary(model: torch.nn.Module) -> str:
    """`trainable 37,504 / 431,104 (8.70%)` plus the per-part breakdown of trainable parameters."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    parts = ", ".join(f"{k} {v:,}" for k, v in trainable_parts(model).items())
    return f"trainable {trainable:,} / {total:,} ({100 * trainable / total:.2f}%): {parts}"


def _base_name(name: str) -> str:
    """A PeftModel parameter name as the base model calls it (drops `base_model.model.` and adapters)."""
    name = name.removeprefix("base_model.model.")
    return re.sub(r"\.(lora_[AB]|lora_embedding_[AB])\.[^.]+", "", name)
