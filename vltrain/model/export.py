"""Export: LoRA adapters merged into an HF-native folder, and any model written back in the original layout.

`merge_lora(ckpt)` writes `<ckpt>-merged`: the base with the adapters folded in (peft's `merge_and_unload`),
sharded safetensors, config.json whose `text_config.architectures` names the LLM class (what LMDeploy reads to
pick its backend), the tokenizer with the template as its Jinja chat template, generation_config.json, and the
checkpoint's `vltrain.yaml` (as a full checkpoint, so `python -m vltrain.infer ckpt_dir=<merged>` loads it) and
data manifest. `merged_from.json` names the checkpoint and a digest of its adapter weights: a later merge of the
same checkpoint reuses the folder, a folder made from something else is never overwritten without `overwrite`.
8-bit models are refused (LoRA deltas cannot be folded into int8 weights without requantising them).

`save_original(model, tokenizer, dst, ...)` writes the `InternVLChatModel` layout OpenGVLab publishes and that
vLLM and LMDeploy serve for InternVL 1.5 / 2.0: original key names (the inverse of `vltrain.model.convert`:
InternViT's fused `attn.qkv`, InternLM2's grouped `wqkv`, `mlp1.*`, `language_model.*`), the original config.json
(`llm_config`, `vision_config`, `template`, `ps_version`, `auto_map`), the tokenizer files of the original base
folder when there is one (else the tokenizer as transformers saves it), and the published modeling files
(`*.py`) copied from that folder (`original_base`: `model.path`, or a hub id's snapshot in the hub cache). vltrain
never writes or runs those files; without a base holding them, `missing_code_message` says where to get them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch

from vltrain.config import ConfigError, TrainConfig
from vltrain.files import write_atomic
from vltrain.manifest import MANIFEST_FILE, RUN_CONFIG
from vltrain.model.convert import fuse_grouped_qkv, save_converted
from vltrain.model.families import FAMILIES, family_by_native_type, family_of, intern_vit, internlm2
from vltrain.model.families.qwen3_moe import split_experts
from vltrain.model.original import is_original_layout

log = logging.getLogger(__name__)

MERGED_FROM = "merged_from.json"
# native text config type -> the causal-LM class an HF-native folder names (LMDeploy picks its backend by it)
LLM_ARCHITECTURES = {f.native_type: f.native_architecture for f in FAMILIES.values()}
# The published LLM of each model type (the native model runs InternLM2 as Llama).
TYPE_LLM = {"internvl-chat-v1_5": "InternLM2ForCausalLM", "internvl-chat-v1_5-int8": "InternLM2ForCausalLM",
            "mini-internvl-chat-2b-v1_5": "InternLM2ForCausalLM", "mini-internvl-chat-4b-v1_5": "Phi3ForCausalLM",
            "internvl2-1b": "Qwen2ForCausalLM", "internvl2-2b": "InternLM2ForCausalLM",
            "internvl2-4b": "Phi3ForCausalLM", "internvl2-8b": "InternLM2ForCausalLM",
            "internvl2-26b": "InternLM2ForCausalLM", "internvl2-40b": "LlamaForCausalLM",
            "internvl2-llama3-76b": "LlamaForCausalLM",
            **{f"internvl2_5-{size}": "Qwen2ForCausalLM" for size in ("1b", "4b", "38b", "78b")},
            **{f"internvl2_5-{size}": "InternLM2ForCausalLM" for size in ("2b", "8b", "26b")},
            **{f"internvl3-{size}": "Qwen2ForCausalLM" for size in ("1b", "2b", "8b", "14b", "38b", "78b")},
            "internvl3-9b": "InternLM2ForCausalLM",  # internlm3-8b-instruct, declared as InternLM2
            **{f"internvl3_5-{size}": "Qwen3ForCausalLM" for size in ("1b", "2b", "4b", "8b", "14b", "38b")},
            "internvl3_5-30b-a3b": "Qwen3MoeForCausalLM", "internvl3_5-241b-a28b": "Qwen3MoeForCausalLM",
            "internvl3_5-gpt-oss-20b-a4b": "GptOssForCausalLM"}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json")


class ExportError(ConfigError):
    """An export that cannot be done; the message says why and what to do."""


# ---- LoRA merge ---------------------------------------------------------------------------------------------


def _adapter_digest(ckpt: Path) -> str:
    from vltrain.model.adapters import foreign_format

    digest = hashlib.sha256()
    if foreign_format(ckpt) is not None:  # ms-swift / official: every file by name, size and time
        for f in sorted(p for p in ckpt.rglob("*") if p.is_file()):
            digest.update(f"{f.relative_to(ckpt)}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
        return digest.hexdigest()
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        if (ckpt / name).is_file():
            digest.update((ckpt / name).read_bytes())
    return digest.hexdigest()


def merged_folder_state(ckpt: Path, dst: Path) -> str:
    """`absent`, `same` (a finished merge of this checkpoint) or `other` (anything else at `dst`)."""
    if not dst.exists():
        return "absent"
    marker = dst / MERGED_FROM
    if marker.is_file():
        made = json.loads(marker.read_text(encoding="utf-8"))
        if made.get("checkpoint") == str(ckpt) and made.get("adapter_sha256") == _adapter_digest(ckpt):
            return "same"
    return "other"


def merge_lora(ckpt_dir: str | Path, dst: str | Path | None = None, overwrite: bool = False,
               reuse: bool = True, model_path: str | None = None) -> Path:
    """Merge the LoRA checkpoint `ckpt_dir` (vltrain's, or an ms-swift / official one on its base or `model_path`)
    into `dst` (default `<ckpt>-merged`); returns `dst`. An existing merge of the same checkpoint is reused
    (`reuse`) unless `overwrite`; a folder made otherwise is refused."""
    import yaml

    from vltrain.config import validate
    from vltrain.model.adapters import foreign_format
    from vltrain.model.load import load_checkpoint

    ckpt = Path(ckpt_dir).resolve()
    foreign = foreign_format(ckpt) is not None
    if not foreign and not (ckpt / "adapter_config.json").is_file():
        raise ExportError(f"ckpt_dir={ckpt}: not a LoRA checkpoint (no adapter_config.json); a full checkpoint "
                          "is already an HF-native folder")
    if not foreign and not (ckpt / RUN_CONFIG).is_file():
        raise ExportError(f"ckpt_dir={ckpt}: not a vltrain checkpoint (no {RUN_CONFIG})")
    cfg = None if foreign else validate(yaml.safe_load((ckpt / RUN_CONFIG).read_text(encoding="utf-8")))
    if cfg is not None and (cfg.model.load_in_8bit or "int8" in cfg.model.name):
        raise ExportError(f"model '{cfg.model.name}' has 8-bit weights: merging LoRA would fold fp deltas into int8 "
                          "weights and requantise them (changing the model). Train LoRA on the 16-bit model type "
                          "(internvl-chat-v1_5) to merge, or serve the adapters with the 8-bit base unmerged")
    dst = Path(dst).resolve() if dst else ckpt.with_name(ckpt.name + "-merged")
    state = merged_folder_state(ckpt, dst)
    if state == "same" and reuse and not overwrite:
        log.info("reusing %s (a merge of this checkpoint; overwrite=true rebuilds it)", dst)
        return dst
    if state == "other" and not overwrite:
        raise ExportError(f"{dst} exists and was not merged from {ckpt}: pass overwrite=true to replace it, or "
                          "dst=<another folder>")
    model, tokenizer, cfg = load_checkpoint(ckpt, model_path)
    model = model.merge_and_unload()
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf_native(model, tokenizer, tmp, cfg.model.template)
    merged_cfg = dataclasses.replace(cfg, sft_type=dataclasses.replace(cfg.sft_type, name="full"),
                                     model=dataclasses.replace(cfg.model, path=str(dst), init="pretrained"))
    # the checkpoint's config already holds absolute data paths
    write_atomic(tmp / RUN_CONFIG, yaml.safe_dump(dataclasses.asdict(merged_cfg), sort_keys=False, allow_unicode=True))
    if (ckpt / MANIFEST_FILE).is_file():
        shutil.copyfile(ckpt / MANIFEST_FILE, tmp / MANIFEST_FILE)
    write_atomic(tmp / MERGED_FROM, json.dumps({"checkpoint": str(ckpt), "adapter_sha256": _adapter_digest(ckpt)},
                                               indent=2) + "\n")
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    return dst


def save_hf_native(model, tokenizer, dst: Path, template: str) -> None:
    """An HF-native folder (see `save_converted`) whose config names the LLM class in `text_config.architectures`."""
    text = model.config.text_config
    text.architectures = [LLM_ARCHITECTURES.get(text.model_type, type(model.model.language_model).__name__)]
    save_converted(model, tokenizer, dst, template)  # keeps a known family's class, names it otherwise


# ---- original layout ----------------------------------------------------------------------------------------


def _invert(table: dict[str, str]) -> dict[str, str]:
    return {new: old for old, new in table.items()}


_VISION_BACK = _invert(intern_vit.LAYER)
_EMBEDDINGS_BACK = _invert(intern_vit.EMBEDDINGS)
_PROJECTOR_BACK = _invert(intern_vit.PROJECTOR)
_INTERNLM2_TOP_BACK = _invert(internlm2.TOP)
_INTERNLM2_LAYER_BACK = _invert(internlm2.LAYER)


def _rename(rest: str, table: dict[str, str]) -> str | None:
    for new, old in table.items():
        if rest == new or (new.endswith(".") and rest.startswith(new)):
            return old + rest[len(new):]
    return None


def original_state_dict(model, llm_arch: str) -> dict[str, torch.Tensor]:
    """The model's weights under the original key names (q/k/v fused back where the original fuses them)."""
    import re

    state = {k: v for k, v in model.state_dict().items()}
    text = model.config.text_config
    family = family_of(llm_arch) or family_by_native_type(text.model_type)
    head, embeddings = state.get("lm_head.weight"), state.get("model.language_model.embed_tokens.weight")
    tied = head is not None and embeddings is not None and head.data_ptr() == embeddings.data_ptr()
    heads = text.num_attention_heads
    kv = text.num_key_value_heads or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for name in list(state):
        if name not in state:
            continue  # consumed with its q/k/v siblings
        tensor = state[name]
        if name.startswith("model.vision_tower.embeddings."):
            old = _EMBEDDINGS_BACK.get(name.removeprefix("model.vision_tower.embeddings."))
            if old:
                out[f"vision_model.embeddings.{old}"] = tensor
                continue
        elif m := re.fullmatch(r"model\.vision_tower\.encoder\.layer\.(\d+)\.(.+)", name):
            prefix, rest = f"model.vision_tower.encoder.layer.{m[1]}.attention.", m[2]
            if q := re.fullmatch(r"attention\.([qkv])_proj\.(weight|bias)", rest):
                parts = [state.pop(f"{prefix}{p}_proj.{q[2]}") for p in "qkv"]
                out[f"vision_model.encoder.layers.{m[1]}.attn.qkv.{q[2]}"] = torch.cat(parts)
                continue
            old = _rename(rest, _VISION_BACK)
            if old:
                out[f"vision_model.encoder.layers.{m[1]}.{old}"] = tensor
                continue
        elif m := re.fullmatch(r"model\.multi_modal_projector\.(\w+)\.(weight|bias)", name):
            if m[1] in _PROJECTOR_BACK:
                out[f"mlp1.{_PROJECTOR_BACK[m[1]]}.{m[2]}"] = tensor
                continue
        elif llm_arch != "InternLM2ForCausalLM":
            if name == "lm_head.weight":
                if not tied:  # a tied head is the embedding matrix, which the original files hold once
                    out["language_model.lm_head.weight"] = tensor
                continue
            if name.startswith("model.language_model."):
                rest = "language_model.model." + name.removeprefix("model.language_model.")
                per_expert = split_experts(rest, tensor) if family.experts == "per_expert" else None
                out.update(per_expert if per_expert is not None else {rest: tensor})
                continue
        elif name in _INTERNLM2_TOP_BACK:
            out["language_model." + _INTERNLM2_TOP_BACK[name]] = tensor
            continue
        elif m := re.fullmatch(r"model\.language_model\.layers\.(\d+)\.(.+)", name):
            prefix, rest = f"model.language_model.layers.{m[1]}.self_attn.", m[2]
            target = f"language_model.model.layers.{m[1]}."
            if q := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
                parts = [state.pop(f"{prefix}{p}_proj.{q[2]}") for p in "qkv"]
                out[f"{target}attention.wqkv.{q[2]}"] = fuse_grouped_qkv(*parts, heads, kv, head_dim)
                continue
            old = _rename(rest, _INTERNLM2_LAYER_BACK)
            if old:
                out[target + old] = tensor
                continue
        unknown.append(name)
        state.pop(name, None)
    if unknown:
        raise ExportError(f"no original key for {len(unknown)} weights: {', '.join(unknown[:10])}")
    return {k: v.contiguous() for k, v in out.items()}


def _legacy_rope(rope: dict | None) -> dict:
    """`rope_theta` and the legacy `rope_scaling` dict of transformers-native `rope_parameters`."""
    rope = dict(rope or {})
    theta = rope.pop("rope_theta", 10000.0)
    kind = rope.pop("rope_type", "default")
    if kind == "default":
        return {"rope_theta": theta, "rope_scaling": None}
    return {"rope_theta": theta, "rope_scaling": {"type": kind, **rope}}


def original_llm_config(text, llm_arch: str, dtype: str) -> dict:
    """The `llm_config` of the original config.json."""
    rope = getattr(text, "rope_parameters", None) or {"rope_type": "default",
                                                      "rope_theta": getattr(text, "rope_theta", 10000.0)}
    common = {"architectures": [llm_arch], "vocab_size": text.vocab_size, "hidden_size": text.hidden_size,
              "intermediate_size": text.intermediate_size, "num_hidden_layers": text.num_hidden_layers,
              "num_attention_heads": text.num_attention_heads, "num_key_value_heads": text.num_key_value_heads,
              "hidden_act": text.hidden_act, "max_position_embeddings": text.max_position_embeddings,
              "initializer_range": text.initializer_range, "rms_norm_eps": text.rms_norm_eps,
              "bos_token_id": getattr(text, "bos_token_id", None), "eos_token_id": getattr(text, "eos_token_id", None),
              "pad_token_id": getattr(text, "pad_token_id", None),
              "tie_word_embeddings": False, "use_cache": True, "torch_dtype": dtype, "attn_implementation": "eager"}
    if llm_arch == "InternLM2ForCausalLM":
        if rope.get("rope_type") not in ("default", "dynamic", "linear"):
            raise ExportError(f"rope type {rope.get('rope_type')!r} has no InternLM2 equivalent")
        scaling = (None if rope.get("rope_type", "default") == "default"
                   else {"type": rope["rope_type"], "factor": rope["factor"]})
        return {**common, "model_type": "internlm2", "bias": bool(text.attention_bias),
                "rope_theta": rope["rope_theta"], "rope_scaling": scaling, "auto_map": {
                    "AutoConfig": "configuration_internlm2.InternLM2Config",
                    "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                    "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"}}
    if llm_arch == "Phi3ForCausalLM":
        phi = {**common, "model_type": "phi3", "rope_theta": rope.get("rope_theta", 10000.0),
               "sliding_window": getattr(text, "sliding_window", None), "resid_pdrop": 0.0, "embd_pdrop": 0.0,
               "attention_dropout": 0.0, "rope_scaling": None}
        if rope.get("rope_type") == "longrope":
            phi["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
            kind = "yarn" if "attention_factor" in rope else "su"
            phi["rope_scaling"] = {"type": kind, "short_factor": list(rope["short_factor"]),
                                   "long_factor": list(rope["long_factor"])}
        return phi
    family = family_of(llm_arch)
    if family is not None and family.llm_config_keys:  # InternVL3.5's LLMs, as transformers 4.5x writes them
        rope_theta = rope.get("rope_theta", 10000.0)
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        return {**common, "model_type": family.native_type, "tie_word_embeddings": bool(text.tie_word_embeddings),
                **{key: getattr(text, key) for key in family.llm_config_keys if hasattr(text, key)},
                "rope_theta": rope_theta,
                "rope_scaling": None if scaling.get("rope_type", "default") == "default" else scaling}
    family = "qwen2" if llm_arch == "Qwen2ForCausalLM" else "llama"
    extra = {"attention_bias": bool(getattr(text, "attention_bias", False)),
             "mlp_bias": bool(getattr(text, "mlp_bias", False))} if family == "llama" else {
        "use_sliding_window": False, "sliding_window": getattr(text, "sliding_window", None) or 32768,
        "max_window_layers": text.num_hidden_layers}
    return {**common, "model_type": family, **extra, **_legacy_rope(rope)}


def original_config(model, llm_arch: str, template: str, max_tiles: int, dtype: str, tokenizer=None) -> dict:
    """The original `InternVLChatConfig` dict of a native model. InternVL3.5's LLM families also carry the top-level
    `eos_token_id` / `pad_token_id` of the published files: the tokenizer's."""
    config = model.config
    top = {}
    family = family_of(llm_arch)
    if family is not None and family.tie_from_llm and tokenizer is not None:
        top = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    vision = config.vision_config
    if not vision.use_mean_pooling:
        raise ExportError("vision_config.use_mean_pooling=false (a final vision norm) has no original equivalent")
    size = vision.image_size[0] if isinstance(vision.image_size, (list, tuple)) else vision.image_size
    patch = vision.patch_size[0] if isinstance(vision.patch_size, (list, tuple)) else vision.patch_size
    return {
        "architectures": ["InternVLChatModel"],
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                     "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                     "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"},
        "downsample_ratio": config.downsample_ratio, "dynamic_image_size": True, "force_image_size": size,
        "llm_config": original_llm_config(config.text_config, llm_arch, dtype),
        "max_dynamic_patch": max_tiles, "min_dynamic_patch": 1, "model_type": "internvl_chat",
        "ps_version": getattr(config, "ps_version", "v2"), "select_layer": config.vision_feature_layer,
        "template": template, "torch_dtype": dtype, "use_backbone_lora": 0, "use_llm_lora": 0, "use_thumbnail": True,
        "vision_config": {
            "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": vision.hidden_size,
            "intermediate_size": vision.intermediate_size, "num_hidden_layers": vision.num_hidden_layers,
            "num_attention_heads": vision.num_attention_heads, "hidden_act": vision.hidden_act,
            "norm_type": vision.norm_type, "layer_norm_eps": vision.layer_norm_eps,
            "qk_normalization": bool(vision.use_qk_norm), "qkv_bias": bool(vision.attention_bias),
            "image_size": size, "patch_size": patch, "num_channels": vision.num_channels,
            "initializer_range": vision.initializer_range, "initializer_factor": vision.layer_scale_init_value,
            "attention_dropout": vision.attention_dropout, "dropout": vision.projection_dropout,
            "drop_path_rate": 0.0, "use_flash_attn": False, "torch_dtype": dtype},
        **top,
    }


def llm_architecture(model_type: str, base: Path | None) -> str:
    """The original LLM class: from the base folder's config.json when it is original, else the model type's;
    else the native class's (Llama, Qwen2, Phi-3)."""
    if base is not None and is_original_layout(base):
        llm = json.loads((base / "config.json").read_text(encoding="utf-8")).get("llm_config") or {}
        if llm.get("architectures"):
            return llm["architectures"][0]
    return TYPE_LLM.get(model_type, "")


ORIGINAL_SIDE_FILES = ["config.json", "*.py", *TOKENIZER_FILES]
"""What an original-layout export takes from its base besides the weights: the config (is it original? which LLM
class?), the published modeling files and the tokenizer files."""


def original_base(path: str | None, hub: str = "hf", token: str | None = None) -> Path | None:
    """The folder an original-layout export copies the modeling files and tokenizer from: `model.path` when it is a
    folder; for a hub id (`OpenGVLab/InternVL2-8B`) its snapshot in the hub cache, where the weights were fetched,
    with the `ORIGINAL_SIDE_FILES` fetched now if they are not there yet. None (with a warning) when there is no
    base or the hub cannot give them: the export then notes where to get them."""
    from vltrain.model.hub import HubError, resolve_model_path

    if not path:
        return None
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    try:
        return resolve_model_path(path, hub, token, files=ORIGINAL_SIDE_FILES)
    except HubError as e:
        log.warning("the modeling and tokenizer files of %s could not be fetched: %s", path, e)
        return None


def missing_code_message(hf_id: str | None) -> str:
    source = f"https://huggingface.co/{hf_id}" if hf_id else "the published model folder (huggingface.co/OpenGVLab)"
    return (f"the original layout runs with the published modeling files (configuration_internvl_chat.py, "
            f"modeling_internvl_chat.py, conversation.py, configuration_intern_vit.py, modeling_intern_vit.py and "
            f"the LLM's own, e.g. modeling_internlm2.py): copy the *.py files of {source} into the folder")


def save_original(model, tokenizer, dst: str | Path, template: str, model_type: str = "", max_tiles: int = 12,
                  base: Path | None = None, hf_id: str | None = None, dtype: torch.dtype | None = None,
                  max_shard_size: str = "5GB") -> list[str]:
    """Write `model` (native) in the original layout into `dst`; returns notes for the user (what is missing)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    from vltrain.progress import progress

    dst = Path(dst)
    base = Path(base) if base is not None and Path(base).is_dir() else None
    llm_arch = llm_architecture(model_type, base) or LLM_ARCHITECTURES.get(model.config.text_config.model_type, "")
    if not llm_arch:
        raise ExportError(f"unknown LLM class for model type {model_type!r}")
    dtype = dtype or next(p.dtype for p in model.parameters() if p.is_floating_point())
    dtype_name = str(dtype).removeprefix("torch.")
    state = {k: v.detach().to("cpu", dtype) for k, v in original_state_dict(model, llm_arch).items()}
    config = original_config(model, llm_arch, template, max_tiles, dtype_name, tokenizer)
    dst.mkdir(parents=True, exist_ok=True)
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for file, names in progress(list(split.filename_to_tensors.items()), desc="writing shards", unit="shard"):
        save_file({n: state[n] for n in names}, dst / file, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": split.tensor_to_filename}
        write_atomic(dst / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
    write_atomic(dst / "config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    notes = []
    copied = []
    if base is not None and is_original_layout(base):
        for name in TOKENIZER_FILES:
            if (base / name).is_file():
                shutil.copyfile(base / name, dst / name)
                copied.append(name)
        for code in sorted(base.glob("*.py")):
            shutil.copyfile(code, dst / code.name)
            copied.append(code.name)
    if "tokenizer_config.json" not in copied:
        tokenizer.save_pretrained(dst)
        notes.append("tokenizer written by transformers (no original base folder to copy its files from)")
    if not any(name.endswith(".py") for name in copied):
        notes.append(missing_code_message(hf_id))
    return notes


# ---- LoRA in the original layout -----------------------------------------------------------------------------


def original_adapter_refusal(peft_model) -> str | None:
    """Why the adapter of `peft_model` is exported merged rather than as an original-layout adapter (vLLM serves
    LoRA on InternVL's language model only), or None."""
    from vltrain.model.adapters import native_lora

    lora = native_lora(peft_model)
    parts = [what for prefix, what in (("model.vision_tower.", "the vision tower"),
                                       ("model.multi_modal_projector.", "the projector"))
             if any(m.startswith(prefix) for m in lora.modules)]
    if parts:
        return (f"the adapter also adapts {' and '.join(parts)}, and vLLM's LoRA serving of the original layout "
                "takes adapters on the language model only")
    if lora.trained:
        return f"weights trained in full besides the adapter ({', '.join(sorted(lora.trained)[:3])})"
    return None


def save_original_lora(peft_model, tokenizer, model_cfg, dst: Path, max_shard_size: str = "5GB") -> list[str]:
    """Write the LoRA adapter of `peft_model` in the original layout into `dst` (`vltrain.model.adapters.
    to_original`: exact), naming its base: `model_cfg.path` when that is an original-layout folder, else the base
    written in the original layout into `<dst>-base`. Returns notes for the user."""
    from vltrain.model.adapters import native_lora, save_original_adapter, to_original

    dst = Path(dst)
    base = Path(model_cfg.path) if model_cfg.path and Path(model_cfg.path).is_dir() else None
    text = peft_model.get_base_model().config.text_config
    llm_arch = llm_architecture(model_cfg.name, base) or LLM_ARCHITECTURES.get(text.model_type, "")
    if not llm_arch:
        raise ExportError(f"unknown LLM class for model type {model_cfg.name!r}")
    lora = to_original(native_lora(peft_model), peft_model.get_base_model(), llm_arch)
    notes = []
    if base is None or not is_original_layout(base):
        base_dst = dst.with_name(dst.name + "-base")
        notes += save_original(peft_model.unload(), tokenizer, base_dst, model_cfg.template, model_cfg.name,
                               model_cfg.max_tiles, base=base, hf_id=model_cfg.hf_id, max_shard_size=max_shard_size)
        notes.append(f"the base model, in the original layout: {base_dst}")
        base = base_dst
    save_original_adapter(lora, dst, str(Path(base).resolve()))
    notes.append(f"original-layout adapter of rank {lora.r}, alpha {lora.alpha:g} on {len(lora.modules)} modules")
    return notes


# ---- `vltrain export` ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ExportOptions:
    ckpt_dir: str | None = None
    merge_lora: bool = False
    to: str = "hf"
    dst: str | None = None
    overwrite: bool = False
    max_shard_size: str = "5GB"


def _check_dst(dst: Path, overwrite: bool) -> None:
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise ConfigError(f"dst={dst}: exists and is not empty; pass overwrite=true to write into it")


def export(cfg: TrainConfig, options: ExportOptions, model_path: str | None = None) -> Path:
    """What `vltrain export` writes (and prints, with notes), returning the folder. `to=hf`: a LoRA checkpoint
    merged (`merge_lora`); `to=original`: a checkpoint (a LoRA adapter on the language model only as an
    original-layout adapter, otherwise merged first) or the model of `cfg.model`, in the original layout.
    `model_path`: the base of a foreign (ms-swift, official) checkpoint, given on the command line."""
    if options.to not in ("hf", "original"):
        raise ConfigError(f"to: '{options.to}' is not one of hf, original")
    if options.to == "hf":
        if not (options.ckpt_dir and options.merge_lora):
            raise ConfigError("to=hf exports a LoRA checkpoint merged: pass ckpt_dir=<checkpoint> merge_lora=true "
                              "(an original folder converts with python -m vltrain.convert)")
        dst = merge_lora(options.ckpt_dir, options.dst, overwrite=options.overwrite, reuse=True,
                         model_path=model_path)
        print(f"merged: {dst}")
        return dst

    from vltrain.model.load import load_checkpoint, load_model_tokenizer

    if options.ckpt_dir:
        ckpt = Path(options.ckpt_dir).resolve()
        dst = Path(options.dst) if options.dst else ckpt.with_name(ckpt.name + "-original")
        _check_dst(dst, options.overwrite)
        try:
            model, tokenizer, run_cfg = load_checkpoint(ckpt, model_path)
        except FileNotFoundError as e:
            raise ConfigError(f"ckpt_dir: {e}") from None
        if hasattr(model, "merge_and_unload"):
            reason = "merge_lora=true" if options.merge_lora else original_adapter_refusal(model)
            if reason is None:
                notes = save_original_lora(model, tokenizer, run_cfg.model, dst, options.max_shard_size)
                print(f"original-layout LoRA adapter: {dst}")
                for note in notes:
                    print(f"note: {note}")
                return dst
            if run_cfg.model.load_in_8bit:
                raise ConfigError("8-bit model: LoRA adapters cannot be folded into int8 weights")
            print(f"note: merging the adapter into the weights: {reason}")
            model = model.merge_and_unload()
        model_cfg = run_cfg.model
    else:
        if not options.dst:
            raise ConfigError("dst=<folder> is required with model=<type> to=original")
        dst = Path(options.dst)
        _check_dst(dst, options.overwrite)
        model, tokenizer = load_model_tokenizer(cfg.model)
        model_cfg = cfg.model
    base = original_base(model_cfg.path, model_cfg.hub, model_cfg.hub_token)
    notes = save_original(model, tokenizer, dst, model_cfg.template, model_cfg.name, model_cfg.max_tiles,
                          base=base, hf_id=model_cfg.hf_id, max_shard_size=options.max_shard_size)
    print(f"original layout: {dst}")
    for note in notes:
        print(f"note: {note}")
    return dst
