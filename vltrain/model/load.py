"""Building and loading models: transformers' native InternVLForConditionalGeneration, random or pretrained, and
checkpoints of a run.

`model.path` is a local folder or a hub id (downloaded by `vltrain.model.hub`). A folder is either HF-native
(config.json of an `internvl` model; loaded with `from_pretrained`, ps-v1 checkpoints with their subclass) or the
original layout OpenGVLab publishes (`InternVLChatModel`, converted while loading by `vltrain.model.convert`).
`init: random` builds the architecture in `model.arch` with random weights and needs no file at all: vocabulary
size and `image_token_id` come from `arch` when there is no tokenizer (benchmarks, parameter counts on `meta`).
Around it: the tokenizer of a config (vltrain.model.vocab), dtype, 8-bit and device placement
(vltrain.model.placement), saving partitioned weights and their digest (vltrain.model.save).

Typical use, tokenizer first so that the data can be checked before any weight is read:

    tokenizer = load_tokenizer_for(cfg.model)
    tile_size, tokens_per_tile = model_geometry(cfg.model)     # config.json only
    ...check or encode records...
    model = load_model(cfg.model, tokenizer, dtype)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    PreTrainedTokenizerBase,
)
from transformers.integrations import is_deepspeed_zero3_enabled

from vltrain.config import ConfigError, ModelConfig, SftConfig
from vltrain.data.encode import Encoder
from vltrain.manifest import BASE_RECORD, RUN_CONFIG
from vltrain.model.generation import configure_generation
from vltrain.model.geometry import model_geometry, tokens_per_tile, vision_geometry
from vltrain.model.hub import resolve_model_path
from vltrain.model.placement import (
    check_model_config,
    int8_config,
    int8_device,
    model_class_of,
    quantize_llm_8bit,
    resolve_device_map,
    resolve_dtype,
)
from vltrain.model.save import weights_digest
from vltrain.model.tokenizer import IMAGE_CONTEXT_TOKEN, load_tokenizer
from vltrain.model.vocab import load_tokenizer_for

log = logging.getLogger(__name__)


# ---- model -------------------------------------------------------------------------------------------------


def load_model_tokenizer(cfg: ModelConfig, dtype: torch.dtype | None = None, seed: int = 42):
    """Return (model, tokenizer) ready for training or generation, in `dtype` (default: resolved)."""
    tokenizer = load_tokenizer_for(cfg)  # validates cfg first
    return load_model(cfg, tokenizer, dtype, seed), tokenizer


def load_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase | None, dtype: torch.dtype | None = None,
               seed: int = 42, *, meta: bool = False, device_map=None, convert_once: bool = False,
               sft: SftConfig | None = None) -> InternVLForConditionalGeneration:
    """The model of `cfg`, on CPU (8-bit: on the GPU, or the CPU), in `dtype` (default: resolved).

    `tokenizer` None is allowed for `init: random` (ids from `model.arch`). `meta=True` (random only) builds the
    architecture on the `meta` device: no memory, for counting parameters. `model.drop_path_rate` > 0 adds
    stochastic depth to the vision layers (active in training mode only).

    At scale: under DeepSpeed ZeRO-3 (TrainingArguments built first) the model is created partitioned, random
    init included, so no process ever holds all of it. `device_map`: a module -> device mapping, or a callable
    that plans one from the model built on `meta` as it will sit in memory (`planning_model`: `dtype`, 8-bit
    layers, and the LoRA adapters of `sft` that training adds after loading); 8-bit weights follow the map too.
    `convert_once`: an original-layout checkpoint is converted
    into an HF-native copy on disk by one process per node (the others wait on a file lock) and loaded from
    there, instead of every process converting in host memory (forced under ZeRO-3 and with a device map).
    """
    if not meta:  # a count on meta neither runs attention nor quantizes
        check_model_config(cfg)
    dtype = dtype or resolve_dtype(cfg.dtype)
    if cfg.init == "random":
        if meta:
            with torch.device("meta"):
                return build_random_model(cfg, tokenizer, seed, check_ids=False)
        if is_deepspeed_zero3_enabled():
            model = build_random_model(cfg, tokenizer, seed, dtype=dtype, partitioned=True)
        else:
            model = build_random_model(cfg, tokenizer, seed).to(dtype)
        plan = None if device_map is None else resolve_device_map(device_map, model.config, dtype, cfg, sft)
        if cfg.load_in_8bit:
            quantize_llm_8bit(model, int8_device(), plan)
        if plan is not None:
            from accelerate import dispatch_model

            model = dispatch_model(model, device_map=plan)
    else:
        if meta:
            raise ConfigError("meta=True builds init=random models only")
        if tokenizer is None:
            raise ConfigError(f"model.path={cfg.path}: a pretrained model loads with its tokenizer "
                              "(load_tokenizer_for)")
        path = resolve_model_path(cfg.path, cfg.hub, cfg.hub_token)
        from vltrain.model.original import is_original_layout

        if is_original_layout(path) and (convert_once or is_deepspeed_zero3_enabled() or device_map is not None):
            path = converted_copy(path, tokenizer, cfg)
        model = _load_folder(path, tokenizer, dtype, cfg, device_map=device_map, sft=sft)
        _check_vocab(model, tokenizer, path)
    # transformers' InternVL fails on an MoE LLM config asking for router logits (a published 3.5 config may); the
    # trainer reads the declared value to decide on the router loss (`vltrain.train.recipe.resolve_router_aux`)
    if getattr(model.config.text_config, "output_router_logits", False):
        model.config.text_config.output_router_logits = False
    if cfg.drop_path_rate > 0:
        from vltrain.model.internvl import set_drop_path

        set_drop_path(model, cfg.drop_path_rate)
    if tokenizer is not None:
        configure_generation(model, tokenizer, cfg.template)
    return model


def _load_folder(path: Path, tokenizer, dtype: torch.dtype, cfg: ModelConfig,
                 device_map=None, sft: SftConfig | None = None) -> InternVLForConditionalGeneration:
    from vltrain.model.convert import load_original
    from vltrain.model.original import is_original_layout

    if is_original_layout(path):
        model = load_original(path, tokenizer, dtype, cfg.attn_impl)
        if cfg.load_in_8bit:
            quantize_llm_8bit(model, int8_device())
        return model
    config = internvl_folder_config(path)
    kwargs = {}
    if device_map is not None:
        kwargs["device_map"] = resolve_device_map(device_map, config, dtype, cfg, sft)
    if cfg.load_in_8bit:
        kwargs["quantization_config"] = int8_config()
        kwargs.setdefault("device_map", {"": int8_device()})
    from safetensors import SafetensorError

    try:
        return model_class_of(config).from_pretrained(
            path, config=config, dtype=dtype,
            attn_implementation=attention_implementations(config.text_config, cfg.attn_impl), **kwargs)
    except (OSError, SafetensorError) as e:  # no weights in the folder, an unreadable shard
        raise ConfigError(f"model.path={path}: {str(e).strip().splitlines()[0]}") from None


CONVERTED_CACHE = Path("~/.cache/vltrain/converted")
"""Where original-layout checkpoints are converted once (per node) for multi-process, ZeRO-3 and device-map runs;
`VLTRAIN_CONVERTED_CACHE` moves it."""


def cached_conversion(src: Path, kind: str, write, salt: str = "") -> Path:
    """The folder `write(dst)` fills from the checkpoint folder `src`, written once per node under the converted
    cache (`VLTRAIN_CONVERTED_CACHE`): the first process to get the lock writes, the others wait on it (no
    collective timeout runs meanwhile) and reuse the folder. Keyed by the folder, its files' sizes and times and
    `salt`, so an updated checkpoint is written again; `kind` (e.g. `base`) tells apart what is made of one folder."""
    import hashlib
    import shutil

    from filelock import FileLock

    src = Path(src).resolve()
    stamp = "|".join(f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in sorted(src.iterdir())
                     if f.is_file())
    key = hashlib.sha256((f"{src}|{stamp}" + (f"|{salt}" if salt else "")).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("VLTRAIN_CONVERTED_CACHE", CONVERTED_CACHE)).expanduser()
    dst = cache / (f"{src.name}-{kind}-{key}" if kind else f"{src.name}-{key}")
    done = dst / ".complete"
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dst) + ".lock"):
        if not done.is_file():
            shutil.rmtree(dst, ignore_errors=True)  # what a process that died while writing left
            dst.mkdir(parents=True)
            write(dst)
            done.write_text(str(src) + "\n", encoding="utf-8")
    return dst


def converted_copy(src: Path, tokenizer, cfg: ModelConfig) -> Path:
    """An HF-native copy of the original-layout folder `src` (`cached_conversion`: converted once per node)."""

    def write(dst: Path) -> None:
        import json

        from vltrain.model.convert import load_original, save_converted

        log.info("converting %s once into %s (other processes wait for it)", src, dst)
        original = json.loads((Path(src) / "config.json").read_text(encoding="utf-8"))
        stored = original.get("torch_dtype") or original.get("dtype") or "bfloat16"  # kept as published
        model = load_original(Path(src), tokenizer, getattr(torch, str(stored).removeprefix("torch.")),
                              cfg.attn_impl)
        save_converted(model, tokenizer, dst, cfg.template)

    return cached_conversion(src, "", write, salt=cfg.template)


def internvl_folder_config(path: Path) -> InternVLConfig:
    """The InternVLConfig of an HF-native folder; a clear error for any other kind of folder."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{path}: no config.json; model.path must be an InternVL checkpoint folder")
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as e:
        raise ConfigError(f"{config_file}: not a config transformers reads ({str(e).splitlines()[0]})") from None
    if not isinstance(config, InternVLConfig):
        raise ConfigError(f"{config_file}: model_type '{config.model_type}' is not an InternVL model (expected "
                          "'internvl', or the original 'internvl_chat' layout)")
    import json

    raw = json.loads(config_file.read_text(encoding="utf-8"))
    if "image_token_id" not in raw and "image_token_index" in raw:  # early -hf configs (InternVL3-38B-hf)
        config.image_token_id = raw["image_token_index"]
    return config


def build_random_model(cfg: ModelConfig, tokenizer=None, seed: int = 42, check_ids: bool = True,
                       dtype: torch.dtype | None = None, partitioned: bool = False) -> InternVLForConditionalGeneration:
    """A randomly initialised InternVL of the architecture in `cfg.arch`, seeded so that it is reproducible.

    With a tokenizer, its length and `<IMG_CONTEXT>` id are used (and must agree with `arch` where it gives
    them); without, `arch.llm.vocab_size` and `arch.image_token_id`. `check_ids=False` skips the check that
    `image_token_id` is inside the vocabulary (a count on `meta` never embeds it). `partitioned`: created through
    transformers' `_from_config`, which under DeepSpeed ZeRO-3 partitions each parameter as it is created
    (`deepspeed.zero.Init`) and initialises the weights one module at a time, so no process holds the model.
    """
    vocab_size = image_token_id = None
    if tokenizer is not None:
        vocab_size = len(tokenizer)
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT_TOKEN)
        arch_vocab = cfg.arch.get("llm", {}).get("vocab_size")
        arch_image = cfg.arch.get("image_token_id")
        if arch_vocab is not None and arch_vocab < vocab_size:
            raise ConfigError(f"model.arch.llm.vocab_size {arch_vocab} of '{cfg.name}' is smaller than the "
                              f"tokenizer ({vocab_size} tokens)")
        if arch_image is not None and arch_image != image_token_id:
            raise ConfigError(f"model.arch.image_token_id {arch_image} of '{cfg.name}' differs from the "
                              f"tokenizer's {IMAGE_CONTEXT_TOKEN} id {image_token_id}")
        vocab_size = arch_vocab or vocab_size
    if not check_ids and image_token_id is None and cfg.arch.get("image_token_id") is None:
        image_token_id = 0  # a count on `meta` embeds no image (types whose id only their tokenizer knows)
    try:
        config = internvl_config(cfg.arch, vocab_size=vocab_size, image_token_id=image_token_id,
                                 attn_impl=cfg.attn_impl)
    except KeyError as e:
        raise ConfigError(f"model.arch of '{cfg.name}' lacks {e} (needs vision, llm and llm.model_type)") from None
    if check_ids and config.image_token_id >= config.text_config.vocab_size:
        raise ConfigError(f"model.arch of '{cfg.name}': image_token_id {config.image_token_id} is outside the "
                          f"vocabulary (llm.vocab_size {config.text_config.vocab_size})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if partitioned:
            return InternVLForConditionalGeneration._from_config(config, dtype=dtype)
        return InternVLForConditionalGeneration(config)


def internvl_config(arch: dict, vocab_size: int | None = None, image_token_id: int | None = None,
                    attn_impl: str = "sdpa") -> InternVLConfig:
    """The InternVLConfig of a `model.arch` mapping: `vision` and `llm` keyword dicts plus top-level keys.

    `vocab_size` (default: `arch.llm.vocab_size`) and `image_token_id` (default: `arch.image_token_id`) come
    from the tokenizer when there is one.
    """
    arch = dict(arch)
    vision = InternVLVisionConfig(**arch.pop("vision"))
    llm = dict(arch.pop("llm"))
    vocab_size = vocab_size or llm.get("vocab_size")
    llm.pop("vocab_size", None)
    if vocab_size is None:
        raise ConfigError("model.arch.llm.vocab_size is needed to build a model without a tokenizer")
    arch_image_token_id = arch.pop("image_token_id", None)
    image_token_id = arch_image_token_id if image_token_id is None else image_token_id
    if image_token_id is None:
        raise ConfigError("model.arch.image_token_id is needed to build a model without a tokenizer")
    # InternVLConfig ties lm_head to the embeddings by default; InternVL 1.5-3 checkpoints never do, InternVL3.5
    # takes it from its LLM (the small Qwen3 sizes tie): `arch.llm.tie_word_embeddings`, false unless given.
    tie = bool(llm.pop("tie_word_embeddings", False))
    # transformers' InternVL returns no router logits, and fails when its MoE LLM is asked for them; whether the
    # router loss is trained is the trainer's decision (`vltrain.train.loss.router_aux_coef` reads `arch.llm`).
    llm.pop("output_router_logits", None)
    text = AutoConfig.for_model(llm.pop("model_type"), vocab_size=vocab_size, **llm)
    text.tie_word_embeddings = tie
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_seq_length=tokens_per_tile(vision.image_size[0], vision.patch_size[0], arch.get("downsample_ratio", 0.5)),
        image_token_id=image_token_id,
        tie_word_embeddings=tie,
        **arch,
    )
    config._attn_implementation = attention_implementations(text, attn_impl)
    return config


def attention_implementations(text_config, attn_impl: str) -> str | dict[str, str]:
    """`attn_impl` for the whole model, or per part where the LLM has no sdpa kernel (GPT-OSS: its attention
    sinks run in eager attention, as the official recipe runs them) and `attn_impl` is sdpa."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    llm_class = MODEL_MAPPING.get(type(text_config), None)
    if attn_impl == "sdpa" and llm_class is not None and not llm_class._supports_sdpa:
        return {"": attn_impl, "vision_config": attn_impl, "text_config": "eager"}
    return attn_impl


def make_encoder(cfg, model=None, tokenizer=None) -> Encoder:
    """The record encoder of a run (`cfg`: a TrainConfig): its template, system, tile budget and image geometry.
    The geometry comes from `model` when given, else from the model config alone (no weights loaded);
    `tokenizer` None loads the model's."""
    if tokenizer is None:
        tokenizer = load_tokenizer_for(cfg.model)
    tile_size, tokens_per_tile = vision_geometry(model) if model is not None else model_geometry(cfg.model)
    return Encoder.from_config(cfg, tokenizer, tile_size, tokens_per_tile)


def _check_vocab(model, tokenizer, path) -> None:
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ConfigError(f"{path}: the tokenizer has {len(tokenizer)} tokens but the model embeds only {rows}")
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT_TOKEN)
    if model.config.image_token_id != image_id:
        raise ConfigError(f"{path}: config image_token_id {model.config.image_token_id} != tokenizer's "
                          f"{IMAGE_CONTEXT_TOKEN} id {image_id}")


def load_saved_weights(model: torch.nn.Module, folder: str | Path) -> None:
    """Copy the weights of a full checkpoint (`save_pretrained` of this model) into `model`, in place and one tensor
    at a time, so that resuming never holds a second copy of the model (a full fine-tune's fp32 weights: 32 GB of
    InternVL2-8B in every process). The file's names are the model's own as `save_pretrained` renamed them
    (transformers' reversed weight conversion, which saving used: `language_model.model.*` for
    `model.language_model.*`); every name and shape must match in both directions. One ConfigError otherwise."""
    from safetensors import safe_open
    from transformers.core_model_loading import revert_weight_conversion

    from vltrain.model.convert import shard_files

    folder = Path(folder)
    state = model.state_dict()  # detached views of the parameters' and buffers' own storage
    own = {id(t) for t in state.values()}
    target = revert_weight_conversion(model, dict(state))
    if any(id(t) not in own for t in target.values()):  # a conversion that builds new tensors, not a renaming
        raise ConfigError(f"{folder}: this model's saved layout is not a renaming of its weights; it cannot be "
                          "loaded in place")
    seen: set[str] = set()
    unexpected: list[str] = []
    with torch.no_grad():
        for file in shard_files(folder):
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name not in target:
                        unexpected.append(name)
                        continue
                    tensor = f.get_tensor(name)
                    if tensor.shape != target[name].shape:
                        raise ConfigError(f"{file}: {name} has shape {tuple(tensor.shape)}, the model's is "
                                          f"{tuple(target[name].shape)}")
                    target[name].copy_(tensor)
                    seen.add(name)
    missing = sorted(set(target) - seen)
    if missing or unexpected:
        raise ConfigError(f"{folder}: the checkpoint does not hold this model's weights (missing: "
                          f"{', '.join(missing[:5]) or 'none'}; unexpected: {', '.join(unexpected[:5]) or 'none'})")


def load_checkpoint(ckpt_dir: str | Path, model_path: str | None = None):
    """(model, tokenizer, TrainConfig) from a `checkpoint-<step>/` folder: LoRA adapters go onto their base model
    (named in the checkpoint's vltrain.yaml), full checkpoints load directly. A random base that is not where the
    run saved it (the checkpoint was copied elsewhere) is rebuilt from its architecture and seed, and must match
    the digest the checkpoint recorded. LoRA checkpoints of ms-swift and of the official scripts load too, their
    adapters converted onto the base their records name, or `model_path` (`vltrain.model.adapters`)."""
    import dataclasses
    import json

    import yaml
    from peft import PeftModel

    from vltrain.config import validate
    from vltrain.model.adapters import foreign_format, load_foreign

    ckpt = Path(ckpt_dir)
    if foreign_format(ckpt) is not None:
        return load_foreign(ckpt, model_path)
    run_config = ckpt / RUN_CONFIG
    if not run_config.is_file():
        raise FileNotFoundError(f"{ckpt}: not a vltrain checkpoint (no {RUN_CONFIG})")
    cfg = validate(yaml.safe_load(run_config.read_text(encoding="utf-8")))
    tokenizer = load_tokenizer(ckpt, template=cfg.model.template)
    dtype = resolve_dtype(cfg.model.dtype)
    if (ckpt / "adapter_config.json").is_file():
        base_record = ckpt / BASE_RECORD
        if base_record.is_file() and not Path(cfg.model.path).is_dir():
            record = json.loads(base_record.read_text(encoding="utf-8"))
            random_cfg = dataclasses.replace(cfg.model, init="random", path=None, tokenizer=None)
            base = build_random_model(random_cfg, tokenizer, record["seed"]).to(getattr(torch, record["dtype"]))
            if weights_digest(base) != record["sha256"]:
                raise ConfigError(f"{ckpt}: its base model {cfg.model.path} is gone and rebuilding it from "
                                  f"{BASE_RECORD} gives other weights (another torch version?)")
            base = base.to(dtype)
            configure_generation(base, tokenizer, cfg.model.template)
        else:
            base = load_model(cfg.model, tokenizer, dtype)
        model = PeftModel.from_pretrained(base, ckpt)
    else:
        # the full checkpoint is an HF-native folder; a drop path rate only matters while training
        model = _load_folder(ckpt, tokenizer, dtype, dataclasses.replace(cfg.model, load_in_8bit=False))
    configure_generation(model, tokenizer, cfg.model.template)
    return model, tokenizer, cfg
