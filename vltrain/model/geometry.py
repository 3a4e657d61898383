"""Image geometry of a model: tile size in pixels and `<IMG_CONTEXT>` tokens per tile, from a loaded model, its
config.json, or `model.arch`, without loading weights."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import InternVLVisionConfig

from vltrain.config import ConfigError, ModelConfig
from vltrain.model.hub import resolve_model_path
from vltrain.model.original import is_original_config, original_sizes


def tokens_per_tile(image_size: int, patch_size: int, downsample_ratio: float) -> int:
    """`<IMG_CONTEXT>` tokens of one tile: (image_size / patch_size)^2 patches, pixel-shuffled by the ratio."""
    return int((image_size // patch_size) ** 2 * downsample_ratio**2)



def original_geometry(original: dict) -> tuple[int, int]:
    """(tile size in pixels, `<IMG_CONTEXT>` tokens per tile) of an original config.json dict."""
    image_size, patch_size, downsample_ratio = original_sizes(original)
    return image_size, tokens_per_tile(image_size, patch_size, downsample_ratio)


def model_geometry(cfg: ModelConfig) -> tuple[int, int]:
    """(tile size in pixels, `<IMG_CONTEXT>` tokens per tile) without loading weights: from `model.arch` for
    `init: random`, else from the checkpoint's config.json (only that file is fetched for a hub id)."""
    if cfg.init == "random":
        try:
            vision = InternVLVisionConfig(**cfg.arch["vision"])
        except KeyError:
            raise ConfigError(f"model.arch of '{cfg.name}' lacks 'vision'") from None
        size = vision.image_size[0]
        return size, tokens_per_tile(size, vision.patch_size[0], cfg.arch.get("downsample_ratio", 0.5))
    path = resolve_model_path(cfg.path, cfg.hub, cfg.hub_token, files=["config.json"])
    return folder_geometry(path)


def folder_geometry(path: Path) -> tuple[int, int]:
    """(tile size, tokens per tile) of a checkpoint folder's config.json, original or HF-native layout."""
    config_file = Path(path) / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{config_file}: cannot read the model config ({e})") from None
    if is_original_config(config):
        return original_geometry(config)
    vision = config.get("vision_config") or {}
    if config.get("model_type") != "internvl" or "image_seq_length" not in config:
        raise ConfigError(f"{config_file}: not an InternVL config (model_type '{config.get('model_type')}')")
    return _side(vision.get("image_size", 448)), int(config["image_seq_length"])


def _side(value) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def vision_geometry(model) -> tuple[int, int]:
    """(tile size in pixels, `<IMG_CONTEXT>` tokens per tile) of a loaded InternVL model, from its config."""
    config = model.config
    return config.vision_config.image_size[0], config.image_seq_length
