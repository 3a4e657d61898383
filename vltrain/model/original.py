"""The original InternVL checkpoint layout (`InternVLChatModel`, as OpenGVLab publishes it): its config.json's class
defaults for absent keys, how to recognise it, and the sizes that decide its image geometry. Shared by the converter
(`vltrain.model.convert`), the exporter and the geometry lookup, so none of them imports another for it."""

from __future__ import annotations

import json
from pathlib import Path

# InternVisionConfig's class defaults (InternViT-6B): what the official code uses for keys absent from
# config.json. InternViT-6B-448px-V1-5's config.json omits norm_type and qk_normalization, for example.
ORIGINAL_VISION_DEFAULTS = {
    "num_channels": 3, "patch_size": 14, "image_size": 224, "qkv_bias": False, "hidden_size": 3200,
    "num_attention_heads": 25, "intermediate_size": 12800, "qk_normalization": True, "num_hidden_layers": 48,
    "hidden_act": "gelu", "norm_type": "rms_norm", "layer_norm_eps": 1e-6, "dropout": 0.0, "attention_dropout": 0.0,
    "initializer_range": 0.02, "initializer_factor": 0.1,
}
# InternVLChatConfig's top-level defaults.
ORIGINAL_DEFAULTS = {"select_layer": -1, "force_image_size": None, "downsample_ratio": 0.5, "ps_version": "v1"}


def is_original_layout(path: Path) -> bool:
    """True for a folder whose config.json is an InternVLChatModel config (the published, remote-code layout)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return False
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return is_original_config(config)


def is_original_config(config: dict) -> bool:
    """True for a config.json dict of the original layout (`InternVLChatConfig`)."""
    return config.get("model_type") == "internvl_chat" or "InternVLChatModel" in (config.get("architectures") or [])


def original_top_level(original: dict) -> dict:
    """The top-level keys of an original config.json, absent (or null) ones at the class defaults."""
    return {**ORIGINAL_DEFAULTS, **{k: v for k, v in original.items() if v is not None}}


def original_vision(original: dict) -> dict:
    """The vision config of an original config.json, absent keys at InternVisionConfig's class defaults."""
    return {**ORIGINAL_VISION_DEFAULTS, **(original.get("vision_config") or {})}


def original_sizes(original: dict) -> tuple[int, int, float]:
    """(tile size in pixels, patch size, downsample ratio): the model resizes its position embeddings to
    `force_image_size` when that is set."""
    vision = original_vision(original)
    image_size = original.get("force_image_size") or vision["image_size"]
    return image_size, vision["patch_size"], original_top_level(original)["downsample_ratio"]
