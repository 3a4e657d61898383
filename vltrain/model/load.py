"""Model and tokenizer loading: transformers' native InternVLForConditionalGeneration, random or pretrained.

`init: random` builds the architecture in `model.arch` with random weights (the embedded tiny default, and
real-size types for benchmarks); `init: pretrained` loads an HF-native InternVL folder. The tokenizer always
carries the nine InternVL tokens, and `image_token_id` is read from it, never assumed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    PreTrainedTokenizerBase,
)

from vltrain.config import ConfigError, ModelConfig
from vltrain.data.templates import get_template
from vltrain.model.tokenizer import IMAGE_CONTEXT_TOKEN, add_internvl_tokens, load_tokenizer

EMBEDDED_TOKENIZER = Path(__file__).resolve().parent.parent / "assets" / "tiny_tokenizer"


def resolve_dtype(name: str) -> torch.dtype:
    """`auto`: bf16 on a GPU that supports it, fp16 on another GPU, fp32 on CPU (CPU bf16 is slow and lossy)."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def load_model_tokenizer(cfg: ModelConfig, dtype: torch.dtype | None = None, seed: int = 42):
    """Return (model, tokenizer) ready for training or generation, on CPU, in `dtype` (default: resolved)."""
    tokenizer = load_tokenizer_for(cfg)
    dtype = dtype or resolve_dtype(cfg.dtype)
    if cfg.init == "random":
        model = build_random_model(cfg, tokenizer, seed).to(dtype)
    else:
        model = InternVLForConditionalGeneration.from_pretrained(
            cfg.path, dtype=dtype, attn_implementation=cfg.attn_impl
        )
        _check_vocab(model, tokenizer, cfg.path)
    configure_generation(model, tokenizer, cfg.template)
    return model, tokenizer


def load_tokenizer_for(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    source = cfg.tokenizer or cfg.path or EMBEDDED_TOKENIZER
    tokenizer = load_tokenizer(source, template=cfg.template)
    add_internvl_tokens(tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_random_model(cfg: ModelConfig, tokenizer, seed: int = 42) -> InternVLForConditionalGeneration:
    """A randomly initialised InternVL of the architecture in `cfg.arch`, seeded so that it is reproducible."""
    try:
        config = internvl_config(cfg.arch, vocab_size=len(tokenizer),
                                 image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT_TOKEN),
                                 attn_impl=cfg.attn_impl)
    except KeyError as e:
        raise ConfigError(f"model.arch of '{cfg.name}' lacks {e} (needs vision, llm and llm.model_type)") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return InternVLForConditionalGeneration(config)


def internvl_config(arch: dict, vocab_size: int | None = None, image_token_id: int = 0,
                    attn_impl: str = "sdpa") -> InternVLConfig:
    """The InternVLConfig of a `model.arch` mapping: `vision` and `llm` keyword dicts plus top-level keys.

    `vocab_size` (default: `arch.llm.vocab_size`) and `image_token_id` come from the tokenizer when there is one.
    """
    arch = dict(arch)
    vision = InternVLVisionConfig(**arch.pop("vision"))
    llm = dict(arch.pop("llm"))
    vocab_size = vocab_size or llm.get("vocab_size")
    llm.pop("vocab_size", None)
    if vocab_size is None:
        raise ConfigError("model.arch.llm.vocab_size is needed to build a model without a tokenizer")
    text = AutoConfig.for_model(llm.pop("model_type"), vocab_size=vocab_size, **llm)
    text.tie_word_embeddings = False
    image_side = vision.image_size[0] // vision.patch_size[0]
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_seq_length=int(image_side**2 * arch.get("downsample_ratio", 0.5) ** 2),
        image_token_id=image_token_id,
        # InternVLConfig ties lm_head to the embeddings by default; InternVL checkpoints never do.
        tie_word_embeddings=False,
        **arch,
    )
    config._attn_implementation = attn_impl
    return config


def vision_geometry(model) -> tuple[int, int]:
    """(tile size in pixels, `<IMG_CONTEXT>` tokens per tile) of an InternVL model, from its config."""
    config = model.config
    return config.vision_config.image_size[0], config.image_seq_length


def configure_generation(model, tokenizer, template_name: str) -> None:
    """Greedy decoding that stops at the template's separator (`<|im_end|>` / `<|end|>`)."""
    stop_id = tokenizer.convert_tokens_to_ids(get_template(template_name).stop_token)
    gen = model.generation_config
    gen.eos_token_id = stop_id
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    gen.do_sample = False


def _check_vocab(model, tokenizer, path) -> None:
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ConfigError(f"{path}: the tokenizer has {len(tokenizer)} tokens but the model embeds only {rows}")
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT_TOKEN)
    if model.config.image_token_id != image_id:
        raise ConfigError(f"{path}: config image_token_id {model.config.image_token_id} != tokenizer's "
                          f"{IMAGE_CONTEXT_TOKEN} id {image_id}")


def load_checkpoint(ckpt_dir: str | Path):
    """(model, tokenizer, TrainConfig) from a `checkpoint-<step>/` folder: LoRA adapters go onto their base model
    (named in the checkpoint's vltrain.yaml), full checkpoints load directly."""
    import yaml
    from peft import PeftModel

    from vltrain.config import validate

    ckpt = Path(ckpt_dir)
    run_config = ckpt / "vltrain.yaml"
    if not run_config.is_file():
        raise FileNotFoundError(f"{ckpt}: not a vltrain checkpoint (no vltrain.yaml)")
    cfg = validate(yaml.safe_load(run_config.read_text(encoding="utf-8")))
    tokenizer = load_tokenizer(ckpt, template=cfg.model.template)
    dtype = resolve_dtype(cfg.model.dtype)
    if (ckpt / "adapter_config.json").is_file():
        base = InternVLForConditionalGeneration.from_pretrained(cfg.model.path, dtype=dtype,
                                                                attn_implementation=cfg.model.attn_impl)
        model = PeftModel.from_pretrained(base, ckpt)
    else:
        model = InternVLForConditionalGeneration.from_pretrained(ckpt, dtype=dtype,
                                                                 attn_implementation=cfg.model.attn_impl)
    configure_generation(model, tokenizer, cfg.model.template)
    return model, tokenizer, cfg
