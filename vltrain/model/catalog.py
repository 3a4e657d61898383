"""The supported InternVL 1.5 / 2.0 / 2.5 / 3 / 3.5 model types: one YAML per type in `vltrain/conf/model/`.

`vltrain models` prints a Markdown table of them (hub ids, backbones, template, tile budget) with
parameter counts by part, counted by building each architecture on the `meta` device: no weights are
downloaded and no memory is allocated, so even the 76B type is counted in about a second.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from transformers import InternVLForConditionalGeneration

from vltrain.config import ModelConfig, validate
from vltrain.model.load import internvl_config
from vltrain.model.tuning import part_of

MODEL_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"

MODEL_TYPES = (
    "internvl-chat-v1_5",
    "internvl-chat-v1_5-int8",
    "mini-internvl-chat-2b-v1_5",
    "mini-internvl-chat-4b-v1_5",
    "internvl2-1b",
    "internvl2-2b",
    "internvl2-4b",
    "internvl2-8b",
    "internvl2-26b",
    "internvl2-40b",
    "internvl2-llama3-76b",
    "internvl2_5-1b",
    "internvl2_5-2b",
    "internvl2_5-4b",
    "internvl2_5-8b",
    "internvl2_5-26b",
    "internvl2_5-38b",
    "internvl2_5-78b",
    "internvl3-1b",
    "internvl3-2b",
    "internvl3-8b",
    "internvl3-9b",
    "internvl3-14b",
    "internvl3-38b",
    "internvl3-78b",
    "internvl3_5-1b",
    "internvl3_5-2b",
    "internvl3_5-4b",
    "internvl3_5-8b",
    "internvl3_5-14b",
    "internvl3_5-38b",
    "internvl3_5-30b-a3b",
    "internvl3_5-241b-a28b",
    "internvl3_5-gpt-oss-20b-a4b",
)

# Total parameter counts published on the model cards (billions).
PUBLISHED_PARAMS_B = {
    "internvl-chat-v1_5": 25.5,
    "internvl-chat-v1_5-int8": 25.5,
    "mini-internvl-chat-2b-v1_5": 2.2,
    "mini-internvl-chat-4b-v1_5": 4.2,
    "internvl2-1b": 0.9,
    "internvl2-2b": 2.2,
    "internvl2-4b": 4.2,
    "internvl2-8b": 8.1,
    "internvl2-26b": 25.5,
    "internvl2-40b": 40.1,
    "internvl2-llama3-76b": 76.3,
    # InternVL2.5 / 3: the hub pages' parameter counts; InternVL3.5: the sums of the vision and language parts the
    # official README lists (0.3 + 0.8 for 1B ... 5.5 + 235.1 for 241B-A28B)
    "internvl2_5-1b": 0.94,
    "internvl2_5-2b": 2.21,
    "internvl2_5-4b": 3.71,
    "internvl2_5-8b": 8.08,
    "internvl2_5-26b": 25.5,
    "internvl2_5-38b": 38.4,
    "internvl2_5-78b": 78.4,
    "internvl3-1b": 0.94,
    "internvl3-2b": 2.09,
    "internvl3-8b": 7.94,
    "internvl3-9b": 9.14,
    "internvl3-14b": 15.1,
    "internvl3-38b": 38.4,
    "internvl3-78b": 78.4,
    "internvl3_5-1b": 1.1,
    "internvl3_5-2b": 2.3,
    "internvl3_5-4b": 4.7,
    "internvl3_5-8b": 8.5,
    "internvl3_5-14b": 15.1,
    "internvl3_5-38b": 38.3,
    "internvl3_5-30b-a3b": 30.8,
    "internvl3_5-241b-a28b": 240.6,
    "internvl3_5-gpt-oss-20b-a4b": 21.2,
}

def model_file(name: str) -> Path:
    return MODEL_DIR / f"{name}.yaml"


def load_model_config(name: str) -> ModelConfig:
    """The validated `ModelConfig` of one model type, read from its YAML file."""
    data = yaml.safe_load(model_file(name).read_text(encoding="utf-8"))
    # validated through the full schema (a dataset section is required there, so a placeholder one)
    return validate({"model": data, "dataset": {"train": ["unused.jsonl"]}}).model


def count_parameters(arch: dict) -> dict[str, int]:
    """Parameters of `arch` by part (vision / projector / llm incl. LM head / total), built on `meta`."""
    image_token_id = None if arch.get("image_token_id") is not None else 0  # no image is embedded here
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(internvl_config(arch, image_token_id=image_token_id,
                                                                 attn_impl="eager"))  # no attention runs here
    parts = {"vision": 0, "projector": 0, "llm": 0}
    for name, p in model.named_parameters():
        parts[part_of(name)] += p.numel()
    parts["total"] = sum(parts.values())
    return parts


def _llm_name(cfg: ModelConfig) -> str:
    llm = cfg.arch["llm"]
    name = f"{llm['model_type']} {llm['num_hidden_layers']}x{llm['hidden_size']}"
    experts = llm.get("num_experts") or llm.get("num_local_experts")
    return f"{name}, {llm['num_experts_per_tok']} of {experts} experts" if experts else name


def _vision_name(cfg: ModelConfig) -> str:
    vision = cfg.arch["vision"]
    return "InternViT-6B" if vision["hidden_size"] == 3200 else "InternViT-300M"


def _b(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"


def table() -> str:
    """The Markdown table printed by `vltrain models`."""
    head = ["type", "HF id", "ModelScope id", "vision", "LLM", "template", "tiles",
            "vision params", "projector", "LLM params", "total", "published"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in MODEL_TYPES:
        cfg = load_model_config(name)
        n = count_parameters(cfg.arch)
        cells = [f"`{name}`", cfg.hf_id, cfg.ms_id, _vision_name(cfg), _llm_name(cfg), cfg.template,
                 str(cfg.max_tiles), _b(n["vision"]), _b(n["projector"]), _b(n["llm"]), _b(n["total"]),
                 f"{PUBLISHED_PARAMS_B[name]}B"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
