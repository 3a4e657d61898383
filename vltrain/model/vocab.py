"""The tokenizer of a model config: `model.tokenizer`, else the one in `model.path` (only its tokenizer files are
downloaded for a hub id), else the embedded tiny tokenizer of the tiny random model; with the InternVL tokens and a
pad token. Loading a tokenizer folder and the InternVL tokens themselves: vltrain.model.tokenizer.

Loaded before the model, so that the data can be checked before any weight is read.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from vltrain.config import ConfigError, ModelConfig
from vltrain.model.hub import resolve_model_path
from vltrain.model.placement import check_model_config
from vltrain.model.tokenizer import add_internvl_tokens, load_tokenizer

EMBEDDED_TOKENIZER = Path(__file__).resolve().parent.parent / "assets" / "tiny_tokenizer"

# Files a tokenizer can need (the weights are fetched only when the model loads).
TOKENIZER_FILES = ["config.json", "tokenizer*", "*.model", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template*"]


def load_tokenizer_for(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of `cfg` with the nine InternVL tokens and a pad token: `model.tokenizer`, else the one in
    `model.path` (only its tokenizer files are downloaded for a hub id), else the embedded tiny tokenizer
    (the tiny random model)."""
    check_model_config(cfg)
    source = cfg.tokenizer or cfg.path
    if source is None:
        if cfg.arch.get("llm", {}).get("vocab_size"):
            raise ConfigError(f"model '{cfg.name}': init=random without model.path needs model.tokenizer for a "
                              "tokenizer (load_model builds it without one)")
        source = EMBEDDED_TOKENIZER
    else:
        source = resolve_model_path(str(source), cfg.hub, cfg.hub_token, files=TOKENIZER_FILES)
    try:
        tokenizer = load_tokenizer(source, template=cfg.template)
    except (ValueError, OSError) as e:  # no or unusable tokenizer files: a wrong folder, not a bug
        key = "model.tokenizer" if cfg.tokenizer else "model.path"
        raise ConfigError(f"{key}: {e}") from None
    add_internvl_tokens(tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
