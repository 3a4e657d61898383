"""ms-swift 2.x's Python inference names, on vltrain's engine (importable from `vltrain` itself):

    import torch
    from vltrain import get_model_tokenizer, get_default_template_type, get_template, inference, inference_stream

    model, tokenizer = get_model_tokenizer('internvl2-8b', torch.bfloat16, model_kwargs={'device_map': 'auto'})
    model.generation_config.max_new_tokens = 256
    template = get_template(get_default_template_type('internvl2-8b'), tokenizer)
    response, history = inference(model, template, 'Describe the picture.', images=['cat.png'])
    for response, history in inference_stream(model, template, 'And its colour?', history, images=['cat.png']):
        ...

`images` (and `videos`) are the media of the whole conversation, as in ms-swift: pass them again with the
history. `objects` are grounding objects as records give them. `model.generation_config` is honoured
(max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty, stop_strings); `stop_words` adds
stop strings. A generation prompt is the training rendering ended by the assistant header.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from vltrain.infer.engine import Conversation, Engine

# ms-swift's names of the templates: each is one of vltrain's formats, with the V1.5 merged image block or not.
SWIFT_TEMPLATES = {"internvl": ("internlm2-chat", True), "internvl-phi3": ("phi3-chat", True),
                   "internvl2": ("internlm2-chat", False), "internvl2-phi3": ("phi3-chat", False)}


class ModelType:
    """ms-swift's model type constants (`ModelType.internvl2_8b == 'internvl2-8b'`)."""

    internvl_chat_v1_5 = "internvl-chat-v1_5"
    internvl_chat_v1_5_int8 = "internvl-chat-v1_5-int8"
    mini_internvl_chat_2b_v1_5 = "mini-internvl-chat-2b-v1_5"
    mini_internvl_chat_4b_v1_5 = "mini-internvl-chat-4b-v1_5"
    internvl2_1b = "internvl2-1b"
    internvl2_2b = "internvl2-2b"
    internvl2_4b = "internvl2-4b"
    internvl2_8b = "internvl2-8b"
    internvl2_26b = "internvl2-26b"
    internvl2_40b = "internvl2-40b"
    internvl2_llama3_76b = "internvl2-llama3-76b"


def seed_everything(seed: int = 42) -> None:
    from transformers import set_seed

    set_seed(seed)


_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _model_config(model_type: str, model_id_or_path: str | None):
    from vltrain.config import compose_config

    overrides = [f"model={model_type}", "dataset=custom", "dataset.train=[unused.jsonl]"]
    if model_id_or_path is not None:
        overrides += [f"model.path={model_id_or_path}", "model.init=pretrained"]
    return compose_config(overrides)


def get_model_tokenizer(model_type: str, torch_dtype: torch.dtype | None = None, model_kwargs: dict | None = None,
                        load_model: bool = True, *, model_id_or_path: str | None = None, **kwargs):
    """(model, tokenizer) of a model type (`conf/model/<type>.yaml`); `model_id_or_path` replaces its
    `model.path` (a folder, an original-layout folder or a hub id). `torch_dtype` None: the type's dtype (`auto`:
    bf16 on a GPU that computes it natively, fp16 on an older GPU, fp32 on CPU; `placement.resolve_dtype`).
    `model_kwargs['device_map']`: 'auto' (default), 'cpu', 'cuda:0' or a dict. `load_model=False` returns (None,
    tokenizer)."""
    from vltrain.model.load import load_model as build_model
    from vltrain.model.vocab import load_tokenizer_for

    cfg = _model_config(model_type, model_id_or_path)
    if torch_dtype is not None:
        if torch_dtype not in _DTYPES:
            raise ValueError(f"torch_dtype must be one of {', '.join(map(str, _DTYPES))}, got {torch_dtype}")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=_DTYPES[torch_dtype]))
    if kwargs.get("use_flash_attn"):
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attn_impl="flash_attention_2"))
    tokenizer = load_tokenizer_for(cfg.model)
    tokenizer.model_type = model_type
    tokenizer.is_multimodal = True
    if not load_model:
        return None, tokenizer
    from vltrain.infer.session import place_on_device

    model = build_model(cfg.model, tokenizer, torch_dtype)
    model = place_on_device(model, (model_kwargs or {}).get("device_map", "auto"))
    model.eval()
    model.model_type = model_type
    model.model_dir = cfg.model.path
    model.is_multimodal = True
    model.vltrain_config = cfg
    return model, tokenizer


class Swift:
    """ms-swift's `Swift.from_pretrained(model, ckpt_dir)`: a LoRA checkpoint onto a model of `get_model_tokenizer`.

        model, tokenizer = get_model_tokenizer('internvl2-8b', model_id_or_path='/data/InternVL2-8B')
        model = Swift.from_pretrained(model, 'output/internvl2-8b/v0-20240901/checkpoint-300')

    The checkpoint is ms-swift's (2.x peft or swift backend, 3.x), the official scripts' or vltrain's; foreign
    adapters are converted exactly onto the native model (`vltrain.model.adapters`)."""

    @staticmethod
    def from_pretrained(model, model_id: str, inference_mode: bool = True, **kwargs):
        from vltrain.model.adapters import adapter_from

        if kwargs:  # ms-swift's others (adapter_name, revision, ...) have no meaning here: refused, not dropped
            raise TypeError(f"Swift.from_pretrained: unsupported keyword argument(s) {', '.join(sorted(kwargs))}; "
                            "it takes model, model_id and inference_mode")
        peft_model = adapter_from(model, model_id, trainable=not inference_mode)
        if inference_mode:
            peft_model.eval()
        return peft_model


def get_default_template_type(model_type: str) -> str:
    """The template of a model type, as its model file names it (`internlm2-chat`, `Hermes-2`, `phi3-chat`,
    `internvl2_5`, `internvl3_5_gpt_oss`)."""
    return _model_config(model_type, None).model.template


@dataclass
class Template:
    """A template bound to a tokenizer (what `inference` encodes with). `merge_image_blocks` None: the model's
    type decides (V1.5 types put all images in one block). `thinking` None: the model's `model.thinking`."""

    template_type: str
    tokenizer: object
    default_system: str | None = None
    max_length: int | None = None
    merge_image_blocks: bool | None = None
    thinking: bool | None = None


def get_template(template_type: str, tokenizer, default_system: str | None = None, max_length: int | None = None,
                 *, thinking: bool | None = None, **kwargs) -> Template:
    """`template_type`: vltrain's names (`internlm2-chat`, `Hermes-2`, `phi3-chat`, `internvl2_5`,
    `internvl3_5_gpt_oss`) or ms-swift's (`internvl`, `internvl2`, `internvl-phi3`, `internvl2-phi3`).
    `thinking=True`: InternVL3.5's thinking prompt as the default system (`internvl2_5` only)."""
    from vltrain.data.templates import get_template as template_format
    from vltrain.data.templates import system_default

    merged = None
    if template_type in SWIFT_TEMPLATES:
        template_type, merged = SWIFT_TEMPLATES[template_type]
    template_format(template_type)  # ValueError naming the closest known template
    if thinking:
        system_default(template_format(template_type), thinking)  # ValueError: no thinking mode
    return Template(template_type, tokenizer, default_system, max_length, merged, thinking)


def _engine(model, template: Template) -> Engine:
    from vltrain.data.encode import Encoder
    from vltrain.model.geometry import vision_geometry

    cfg = getattr(model, "vltrain_config", None)
    tile_size, tokens = vision_geometry(model)
    max_tiles = cfg.model.max_tiles if cfg else 12
    merged = template.merge_image_blocks
    if merged is None:
        merged = cfg.model.merge_image_blocks if cfg else False
    system = template.default_system if template.default_system is not None else (cfg.model.system if cfg else None)
    thinking = template.thinking if template.thinking is not None else (cfg.model.thinking if cfg else False)
    encoder = Encoder(template.tokenizer, template.template_type, system, max_tiles,
                      template.max_length or 1 << 30, tokens, tile_size, merge_image_blocks=merged,
                      video_frames=cfg.data.video_frames if cfg else 8, thinking=thinking)
    return Engine(model, encoder)


def _conversation(query, history, system, images, videos, objects) -> Conversation:
    return Conversation(query=query, history=[tuple(p) for p in history or []], system=system,
                        images=list(images or []), videos=list(videos or []), objects=objects)


def inference(model, template: Template, query: str, history: list | None = None, system: str | None = None,
              images: list | None = None, *, generation_config=None, stop_words: list[str] | None = None,
              videos: list | None = None, objects=None, **kwargs) -> tuple[str, list[list[str]]]:
    """(response, history with this round appended)."""
    engine = _engine(model, template)
    conversation = _conversation(query, history, system, images, videos, objects)
    response = engine.generate([conversation], generation_config=generation_config, stop_words=stop_words)[0]
    return response, [*[list(p) for p in history or []], [query, response]]


def inference_stream(model, template: Template, query: str, history: list | None = None, system: str | None = None,
                     images: list | None = None, *, generation_config=None, stop_words: list[str] | None = None,
                     videos: list | None = None, objects=None, **kwargs) -> Iterator[tuple[str, list[list[str]]]]:
    """Yields (response so far, history whose last round holds it); the last response equals `inference`'s
    under greedy decoding."""
    engine = _engine(model, template)
    conversation = _conversation(query, history, system, images, videos, objects)
    past = [list(p) for p in history or []]
    for response in engine.stream(conversation, generation_config=generation_config, stop_words=stop_words):
        yield response, [*past, [query, response]]
