"""LoRA adapters in the layouts ms-swift and the official InternVL scripts write <-> vltrain's (peft on the native
`InternVLForConditionalGeneration`), exact or refused: the foreign checkpoints `vltrain.model.adapter_formats` reads,
mapped onto the native model and attached (`adapter_on`, `load_foreign`, `convert_adapter`, `adapter_from`), and
vltrain's adapters mapped back to the original layout (`to_original`).

The mapping (reference: peft's LoRA update W + s B A, s = alpha / r, or alpha / sqrt(r) with rsLoRA): selecting
rows R of a fused weight gives W[R] + s B[R] A, so lora_A is copied to each native part and lora_B (and a DoRA
magnitude, one value per output row) is row-sliced exactly as `vltrain.model.convert` slices the base weight
(InternLM2's grouped `wqkv`, InternViT's even `attn.qkv` split); r and alpha stay. Phi-3's fused `qkv_proj` /
`gate_up_proj` are fused in the native class too: renamed only. A key with no native module, a shape the native
module does not have, or a setting peft cannot express there is one AdapterError naming it.

The other way (`to_original`): q/k/v adapters of one fused original module become one adapter of rank 3r (A
stacked, B block-diagonal), every other module padded with zero rows to the same rank, and alpha scaled so the
scale stays (alpha * 3 plain, alpha * sqrt(3) rsLoRA); rank r when the three A's are equal (a converted adapter
not trained since). Exact either way.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from pathlib import Path

import torch

from vltrain.model.adapter_formats import (
    AdapterError,
    ForeignCheckpoint,
    Lora,
    foreign_format,
    pattern_value,
    read_foreign,
    read_json,
)
from vltrain.model.hub import looks_like_hub_id

log = logging.getLogger(__name__)

CONVERTED_FROM = "converted_from.json"
"""In a checkpoint written by `convert_adapter`: the foreign folder and its format."""

# ---- original -> native -----------------------------------------------------------------------------------------


_EXPERT_MODULE = re.compile(r"\.mlp\.experts\.(\d+\.)?\w+$")


def layout_config(model, original_modules) -> dict:
    """What the key conversion reads of an original config (`llm_config` architecture and head counts), from the
    native model's text config by its family (`vltrain.model.families`): InternLM2 (run as Llama natively) is told
    by the adapter's module names. A family vltrain does not convert, or LoRA on MoE experts (fused 3D parameters
    natively, which peft's LoRA does not adapt), is an AdapterError naming it."""
    from vltrain.model.families import FAMILIES, family_by_native_type

    text = model.config.text_config
    internlm2 = any(re.search(r"\.(attention\.(wqkv|wo)|feed_forward\.w[123])$", m) or m == "language_model.output"
                    for m in original_modules)
    family = FAMILIES["InternLM2ForCausalLM"] if internlm2 else family_by_native_type(text.model_type)
    if family is None:
        raise AdapterError(f"LoRA on a {text.model_type!r} language model: not a family vltrain converts adapters of "
                           f"({', '.join(f.name for f in FAMILIES.values())})")
    experts = sorted(m for m in original_modules if m.startswith("language_model.") and _EXPERT_MODULE.search(m))
    if family.experts and experts:
        raise AdapterError(f"{experts[0]}{f' (and {len(experts) - 1} more)' if len(experts) > 1 else ''}: LoRA on "
                           f"{family.name}'s MoE experts cannot be represented: the native model fuses each layer's "
                           "experts into 3D parameters, which peft's LoRA does not adapt (LoRA on attention and the "
                           "dense layers is supported)")
    heads = text.num_attention_heads
    return {"llm_config": {"architectures": [family.architecture], "hidden_size": text.hidden_size,
                           "num_attention_heads": heads, "num_key_value_heads": text.num_key_value_heads or heads,
                           "head_dim": getattr(text, "head_dim", None) or text.hidden_size // heads}}


def to_native(lora: Lora, model, where: str = "") -> Lora:
    """`lora` (original module names) on the native `model`'s modules: lora_A copied to each native part of a fused
    module, lora_B and DoRA magnitudes row-sliced as the base weight is. Shapes are checked against `model`."""
    from vltrain.model.convert import ConversionError, convert_rows

    layout = layout_config(model, lora.modules)
    linears = _linears(model)
    out = dataclasses.replace(lora, modules={}, ranks={}, alphas={}, trained={})
    for module, parts in lora.modules.items():
        try:
            rows = convert_rows(f"{module}.weight", parts["lora_B"], layout)
            magnitudes = (convert_rows(f"{module}.weight", parts["lora_magnitude_vector"], layout)
                          if "lora_magnitude_vector" in parts else None)
        except ConversionError as e:
            raise AdapterError(f"{where}{module}: {e}") from None
        if not rows:
            raise AdapterError(f"{where}{module}.lora_A: the native InternVLForConditionalGeneration has no module "
                               "for it; LoRA on it cannot be represented")
        for i, (name, b) in enumerate(rows):
            native = name.removesuffix(".weight")
            layer = linears.get(native)
            if layer is None:
                raise AdapterError(f"{where}{module}.lora_A: maps to {native}, which the model has not (another "
                                   "base than the adapter was trained on?)")
            a = parts["lora_A"]
            if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
                raise AdapterError(f"{where}{module}: lora_A {tuple(a.shape)} / lora_B slice {tuple(b.shape)} do not "
                                   f"fit {native} ({layer.out_features} x {layer.in_features}): another base?")
            new = {"lora_A": a.clone(), "lora_B": b.contiguous().clone()}
            if magnitudes:
                new["lora_magnitude_vector"] = magnitudes[i][1].contiguous().clone()
            out.modules[native] = new
            if module in lora.ranks:
                out.ranks[native] = lora.ranks[module]
            if module in lora.alphas:
                out.alphas[native] = lora.alphas[module]
    for key, tensor in lora.trained.items():
        pairs = convert_rows(key, tensor, layout)
        if not pairs:
            raise AdapterError(f"{where}{key}: a trained weight with no native counterpart")
        out.trained.update(pairs)
    return out


def _linears(model) -> dict[str, torch.nn.Module]:
    """Linear layers by name, peft's LoRA-wrapped ones included (they keep in_features / out_features)."""
    return {n: m for n, m in model.named_modules() if isinstance(getattr(m, "in_features", None), int)
            and isinstance(getattr(m, "out_features", None), int)}


def lora_config(lora: Lora, inference_mode: bool = True):
    """The peft LoraConfig of a native `Lora`: explicit module names (a regex of the original names is not
    translated), per-module ranks and alphas as escaped full-name patterns, fully trained modules to save."""
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, use_rslora=lora.use_rslora,
                      use_dora=lora.use_dora, target_modules=sorted(lora.modules),
                      rank_pattern={re.escape(m): r for m, r in lora.ranks.items()},
                      alpha_pattern={re.escape(m): a for m, a in lora.alphas.items()},
                      modules_to_save=sorted({k.rsplit(".", 1)[0] for k in lora.trained}) or None,
                      task_type="CAUSAL_LM", inference_mode=inference_mode)


def attach(model, lora: Lora, trainable: bool = False):
    """A peft model of the native `model` carrying `lora` (native names), weights copied in exactly."""
    from peft import get_peft_model

    from vltrain.model import tuning  # noqa: F401  (installs its filter of a transformers warning peft triggers)

    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = get_peft_model(model, lora_config(lora, inference_mode=not trainable))
    params = dict(peft_model.named_parameters())
    for module, parts in lora.modules.items():
        for part, tensor in parts.items():
            leaf = f"{part}.default.weight"
            _copy(params, f"base_model.model.{module}.{leaf}", tensor)
    for key, tensor in lora.trained.items():
        module, leaf = key.rsplit(".", 1)
        _copy(params, f"base_model.model.{module}.modules_to_save.default.{leaf}", tensor)
    if not trainable:
        peft_model.eval()
    return peft_model


def _copy(params: dict, name: str, tensor: torch.Tensor) -> None:
    target = params.get(name)
    if target is None:
        raise AdapterError(f"{name}: peft created no such parameter")
    if target.shape != tensor.shape:
        raise AdapterError(f"{name}: shape {tuple(tensor.shape)}, peft's parameter is {tuple(target.shape)}")
    with torch.no_grad():
        target.copy_(tensor.to(target.dtype))


def official_trained(foreign: ForeignCheckpoint, model, tolerance: float = 0.0) -> dict[str, torch.Tensor]:
    """The official checkpoint's non-LoRA weights checked against the native base `model`: a layer that carries
    LoRA must hold the base's weights (AdapterError naming the key otherwise); any other weight that differs
    (an unfrozen projector, say) is returned, original names, to be carried as trained."""
    from vltrain.model.convert import convert_rows

    from vltrain.model.families import FAMILIES

    layout = layout_config(model, foreign.lora.modules)
    family = FAMILIES[layout["llm_config"]["architectures"][0]]
    native = model.state_dict()
    trained = {}
    for key, tensor in foreign.base_state.items():
        if family.experts == "per_expert" and _EXPERT_MODULE.search(key.removesuffix(".weight")):
            raise AdapterError(f"{foreign.path}: {key}: official whole-model checkpoints of {family.name} models are "
                               "not supported: their per-expert weights are fused natively and cannot be checked "
                               "against the base one by one")
        pairs = convert_rows(key, tensor, layout)
        if pairs is None:
            raise AdapterError(f"{foreign.path}: {key}: a weight with no native counterpart")
        changed = False
        for name, part in pairs:
            if name not in native or native[name].shape != part.shape:
                raise AdapterError(f"{foreign.path}: {key}: does not fit the base ({name}); another base model?")
            base = native[name].detach().to("cpu", part.dtype)
            if not torch.allclose(base.float(), part.float(), rtol=0, atol=tolerance):
                changed = True
        if changed and key in foreign.lora_base_keys:
            raise AdapterError(f"{foreign.path}: {key} (base_layer of a LoRA layer) differs from the base model's "
                               "weight: the adapter was trained on another base; pass model.path=<that base>")
        if changed:
            trained[key] = tensor
    return trained


# ---- native -> original -----------------------------------------------------------------------------------------


class _StateView:
    """What `vltrain.model.export.original_state_dict` reads of a model: a state dict and the text config."""

    def __init__(self, state: dict, config):
        self._state, self.config = state, config

    def state_dict(self):
        return dict(self._state)


def _original_of(group: dict[str, torch.Tensor], model, llm_arch: str) -> tuple[str, torch.Tensor]:
    """(original module, fused rows) of native modules that make up one original module, given their row tensors."""
    from vltrain.model.export import original_state_dict

    out = original_state_dict(_StateView({f"{m}.weight": t for m, t in group.items()}, model.config), llm_arch)
    (key, rows), = out.items()
    return key.removesuffix(".weight"), rows


def _siblings(module: str, llm_arch: str) -> list[str] | None:
    """The q/k/v native modules fused into one original module (InternViT always, InternLM2's LLM), or None."""
    m = re.fullmatch(r"(.+\.)([qkv])_proj", module)
    if m is None:
        return None
    vision = module.startswith("model.vision_tower.")
    if vision or (llm_arch == "InternLM2ForCausalLM" and module.startswith("model.language_model.")):
        return [f"{m[1]}{p}_proj" for p in "qkv"]
    return None


def to_original(lora: Lora, model, llm_arch: str) -> Lora:
    """`lora` (native names, on `model`) as an adapter on the original modules (see the module docstring)."""
    linears = _linears(model)
    if lora.trained:
        raise AdapterError(f"weights trained in full ({', '.join(sorted(lora.trained)[:3])}) have no place in an "
                           "original-layout adapter")
    groups: list[list[str]] = []
    seen = set()
    for module in sorted(lora.modules):
        if module in seen:
            continue
        members = _siblings(module, llm_arch) or [module]
        seen.update(members)
        groups.append(members)
    scales = {lora.scale(m) for m in lora.modules}
    if len(scales) != 1:
        raise AdapterError("adapters with per-module ranks or alphas that change the scale are not exported to the "
                           "original layout")
    ranks = {lora.ranks.get(m, lora.r) for m in lora.modules}
    r = ranks.pop() if len(ranks) == 1 else None
    if r is None:
        raise AdapterError("adapters with several ranks are not exported to the original layout")
    stacked = any(len(g) > 1 and not _same_a(lora, g) for g in groups)
    rank = 3 * r if stacked else r
    out = Lora({}, rank, lora.alpha * (math.sqrt(rank / r) if lora.use_rslora else rank / r), lora.dropout,
               lora.use_rslora, lora.use_dora)
    for members in groups:
        present = [m for m in members if m in lora.modules]
        a_ref = lora.modules[present[0]]["lora_A"]
        if len(members) == 1:
            a, b_rows = a_ref, {members[0]: lora.modules[members[0]]["lora_B"]}
        elif _same_a(lora, members):
            a, b_rows = a_ref, {m: lora.modules[m]["lora_B"] for m in members}
        else:
            blocks = []
            b_rows = {}
            for i, m in enumerate(members):
                out_features = linears[m].out_features
                block = torch.zeros(out_features, 3 * r, dtype=a_ref.dtype)
                if m in lora.modules:
                    blocks.append(lora.modules[m]["lora_A"])
                    block[:, i * r:(i + 1) * r] = lora.modules[m]["lora_B"]
                else:
                    blocks.append(torch.zeros_like(a_ref))
                b_rows[m] = block
            a = torch.cat(blocks)
        a_full = torch.zeros(rank, a.shape[1], dtype=a.dtype)
        a_full[: a.shape[0]] = a
        b_rows = {m: _pad_cols(t, rank) for m, t in b_rows.items()}
        name, b = _original_of(b_rows, model, llm_arch)
        parts = {"lora_A": a_full, "lora_B": b}
        if lora.use_dora:
            mags = {m: lora.modules[m]["lora_magnitude_vector"] for m in members if m in lora.modules}
            if len(mags) != len(members):
                raise AdapterError(f"{members[0]}: DoRA on some of the fused q/k/v modules only")
            parts["lora_magnitude_vector"] = _original_of(mags, model, llm_arch)[1]
        out.modules[name] = parts
    return out


def _same_a(lora: Lora, members: list[str]) -> bool:
    if not all(m in lora.modules for m in members):
        return False
    first = lora.modules[members[0]]["lora_A"]
    return all(torch.equal(lora.modules[m]["lora_A"], first) for m in members[1:])


def _pad_cols(b: torch.Tensor, rank: int) -> torch.Tensor:
    if b.shape[1] == rank:
        return b
    out = torch.zeros(b.shape[0], rank, dtype=b.dtype)
    out[:, : b.shape[1]] = b
    return out


def native_lora(peft_model) -> Lora:
    """The (single, `default`) LoRA adapter of a peft model on the native class, as a `Lora` with native names."""
    config = peft_model.peft_config["default"]
    if config.modules_to_save:
        trained_modules = list(config.modules_to_save)
    else:
        trained_modules = []
    modules: dict[str, dict[str, torch.Tensor]] = {}
    trained = {}
    for name, param in peft_model.named_parameters():
        name = name.removeprefix("base_model.model.")
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B|lora_magnitude_vector)\.default\.weight", name)
        if m:
            modules.setdefault(m[1], {})[m[2]] = param.detach().float().cpu()
        elif ".modules_to_save.default." in name:
            trained[name.replace(".modules_to_save.default.", ".")] = param.detach().cpu()
    if trained_modules and not trained:
        raise AdapterError("modules_to_save without weights")
    ranks = {m: p["lora_A"].shape[0] for m, p in modules.items() if p["lora_A"].shape[0] != config.r}
    alphas = {}
    for m in modules:
        alpha = pattern_value(config.alpha_pattern or {}, m)
        if alpha is not None and alpha != config.lora_alpha:
            alphas[m] = float(alpha)
    return Lora(modules, config.r, float(config.lora_alpha), config.lora_dropout, bool(config.use_rslora),
                bool(config.use_dora), ranks, alphas, trained)


def save_original_adapter(lora: Lora, dst: Path, base: str) -> None:
    """An original-layout peft adapter folder as ms-swift 2.x writes it (keys `base_model.model.<module>.lora_A.
    weight`, explicit `target_modules`), which vLLM's LoRA serving of InternVLChatModel and ms-swift read."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    state = {}
    for module, parts in lora.modules.items():
        for part, tensor in parts.items():
            leaf = part if part == "lora_magnitude_vector" else f"{part}.weight"
            state[f"base_model.model.{module}.{leaf}"] = tensor.contiguous()
    save_file(state, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, use_rslora=lora.use_rslora,
                        use_dora=lora.use_dora, target_modules=sorted(lora.modules), task_type="CAUSAL_LM",
                        base_model_name_or_path=base, inference_mode=True)
    config.save_pretrained(str(dst))


# ---- loading, converting, starting from -------------------------------------------------------------------------


def resolve_base(foreign: ForeignCheckpoint, model_path: str | None = None) -> str:
    """The base model of `foreign`: `model_path` when given, else the first record that is a folder here (or a hub
    id vltrain can download); an official checkpoint without either is its own base (its base_layer weights)."""
    if model_path:
        return str(model_path)
    for _, value in foreign.base_records:
        if Path(value).expanduser().is_dir():
            return str(Path(value).expanduser().resolve())
    for _, value in foreign.base_records:
        if looks_like_hub_id(value) and not Path(value).expanduser().exists():
            return value
    if foreign.format == "official":
        return str(foreign.path)
    said = "; ".join(f"{where}: {value}" for where, value in foreign.base_records) or "no base recorded"
    raise AdapterError(f"{foreign.path}: its base model is not here ({said}); pass model.path=<the base model folder "
                       "or hub id>")


def _template_of(base: str, model_type: str | None) -> tuple[str | None, str]:
    """(vltrain model type or None, template): the template from the base's original config.json, else from
    the model type's YAML."""
    from vltrain.config import group_options

    known = model_type if model_type in group_options("model") else None
    config_file = Path(base) / "config.json"
    if not config_file.is_file() and not known and looks_like_hub_id(base):
        from vltrain.model.hub import resolve_model_path

        config_file = resolve_model_path(base, files=["config.json"]) / "config.json"  # the base loads from there
    if config_file.is_file():
        config = read_json(config_file)
        if config.get("template"):
            return known, config["template"]
    if known:
        from vltrain.config import compose_config

        return known, compose_config([f"model={known}", "dataset.train=[unused.jsonl]"]).model.template
    raise AdapterError(f"{base}: no `template` in its config.json and no model type vltrain knows in the "
                       "checkpoint's records; convert the base first or give an original-layout base (model.path=)")


def foreign_config(foreign: ForeignCheckpoint, base: str, native: Lora | None = None):
    """The TrainConfig vltrain keeps for a converted foreign checkpoint: the model type (when ms-swift recorded
    one vltrain knows) on the base, the template, LoRA settings and targets of the converted adapter."""
    from vltrain.config import compose_config

    model_type, template = _template_of(base, foreign.model_type)
    cfg = compose_config([f"model={model_type or 'tiny'}", "dataset=custom", "dataset.train=[unused.jsonl]"])
    model = dataclasses.replace(cfg.model, path=base, init="pretrained", template=template, tokenizer=None)
    if model_type is None:
        model = dataclasses.replace(model, name=Path(base).name or "converted", arch={}, hf_id=None, ms_id=None)
    lora = native or foreign.lora
    sft = dataclasses.replace(cfg.sft_type, name="lora", lora_rank=lora.r, lora_alpha=int(lora.alpha)
                              if float(lora.alpha).is_integer() else lora.alpha, lora_dropout=lora.dropout,
                              lora_targets=sorted(lora.modules))
    dataset = dataclasses.replace(cfg.dataset, train=list(foreign.dataset) or [str(foreign.path / "unrecorded.jsonl")],
                                  val_ratio=0.0)
    return dataclasses.replace(cfg, model=model, sft_type=sft, dataset=dataset)


def _extracted_base(foreign: ForeignCheckpoint) -> Path:
    """An official checkpoint's own base (its `base_layer` and other weights, unwrapped), written once as an
    original-layout folder next to vltrain's converted copies."""
    from vltrain.model.load import cached_conversion

    def write(dst: Path) -> None:
        import shutil

        from safetensors.torch import save_file

        src = foreign.path
        for f in src.iterdir():
            if f.is_file() and not f.name.startswith(("model", "pytorch_model", "config.json")):
                shutil.copyfile(f, dst / f.name)
        config = read_json(src / "config.json")
        config.update(use_llm_lora=0, use_backbone_lora=0)
        (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        by_shard: dict[str, list[str]] = {}
        for key in foreign.base_state:
            by_shard.setdefault(foreign.base_state.shard_of(key), []).append(key)
        weight_map = {}
        for i, keys in enumerate(by_shard.values()):  # one source shard in memory at a time
            name = f"model-{i + 1:05d}-of-{len(by_shard):05d}.safetensors"
            save_file({k: foreign.base_state[k].contiguous() for k in keys}, str(dst / name),
                      metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(keys, name))
        (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                     indent=2) + "\n", encoding="utf-8")

    return cached_conversion(foreign.path, "base", write)


def adapter_on(model, foreign: ForeignCheckpoint, trainable: bool = False):
    """The peft model of the native base `model` with `foreign`'s adapter (and, for an official checkpoint, the
    weights it trained besides) converted onto it."""
    lora = foreign.lora
    if foreign.format == "official":
        lora = dataclasses.replace(lora, trained=official_trained(foreign, model))
        if lora.trained:
            log.info("%s: carried as trained weights (they differ from the base): %s", foreign.path,
                     ", ".join(sorted(lora.trained)))
    native = to_native(lora, model, where=f"{foreign.path}: ")
    return attach(model, native, trainable=trainable), native


def load_foreign(path: str | Path, model_path: str | None = None, dtype: torch.dtype | None = None):
    """(peft model, tokenizer, TrainConfig) of a foreign LoRA checkpoint: its base loaded as vltrain loads any
    model (an original-layout base converted on the way), the adapter converted onto it."""
    from vltrain.model.generation import configure_generation
    from vltrain.model.load import load_model
    from vltrain.model.placement import resolve_dtype
    from vltrain.model.vocab import load_tokenizer_for

    foreign = read_foreign(path)
    base = resolve_base(foreign, model_path)
    if foreign.format == "official" and Path(base).resolve() == foreign.path.resolve():
        base = str(_extracted_base(foreign))
    cfg = foreign_config(foreign, base)
    tokenizer = load_tokenizer_for(cfg.model)
    model = load_model(cfg.model, tokenizer, dtype or resolve_dtype(cfg.model.dtype))
    model.config._name_or_path = model.name_or_path = base
    log.info("%s: %s LoRA checkpoint on the base %s", foreign.path, foreign.format, base)
    peft_model, native = adapter_on(model, foreign)
    configure_generation(peft_model, tokenizer, cfg.model.template)
    return peft_model, tokenizer, foreign_config(foreign, base, native)


def convert_adapter(src: str | Path, dst: str | Path, model_path: str | None = None) -> Path:
    """Write the foreign LoRA checkpoint `src` as a vltrain checkpoint folder `dst`: the peft adapter on the native
    names (adapter_config.json naming the base), the tokenizer, vltrain.yaml and `converted_from.json`. Plain
    transformers + peft load it onto the base converted with `python -m vltrain.convert src=<base>`."""
    import yaml

    from vltrain.files import write_atomic
    from vltrain.manifest import RUN_CONFIG

    dst = Path(dst)
    model, tokenizer, cfg = load_foreign(src, model_path, dtype=torch.float32)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    write_atomic(dst / RUN_CONFIG, yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, allow_unicode=True))
    write_atomic(dst / CONVERTED_FROM, json.dumps({"source": str(Path(src).resolve()),
                                                   "format": foreign_format(src), "base": cfg.model.path}, indent=2)
                 + "\n")
    return dst


def adapter_from(model, path: str | Path, trainable: bool = True, where: str = ""):
    """The peft model of `model` (a native base) with the adapter in `path`: a vltrain LoRA checkpoint, or a
    foreign one (ms-swift, official) converted onto it; its weights only, nothing of its optimizer. `where` prefixes
    the errors (the setting that named `path`)."""
    from peft import PeftModel

    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"{where}{path}: no such folder")
    if foreign_format(path) is not None:
        peft_model, _ = adapter_on(model, read_foreign(path), trainable=trainable)
        return peft_model
    if not (path / "adapter_config.json").is_file():
        raise AdapterError(f"{where}{path}: not a LoRA checkpoint (vltrain, ms-swift or official InternVL; no "
                           "adapter_config.json)")
    for p in model.parameters():
        p.requires_grad_(False)
    return PeftModel.from_pretrained(model, path, is_trainable=trainable)


def start_from(model, path: str | Path):
    """The trainable peft model that continues the adapter in `path` (`adapter_from` onto the run's base)."""
    return adapter_from(model, path, trainable=True, where="sft_type.init_adapter=")


def is_lora_checkpoint(path: str | Path) -> bool:
    """A vltrain LoRA checkpoint or a foreign one (ms-swift, official)."""
    return (Path(path) / "adapter_config.json").is_file() or foreign_format(path) is not None


def given_model_path(argv: list[str]) -> str | None:
    """The `model.path=` of a command line (the base of a foreign checkpoint), None when not given."""
    for arg in argv:
        if arg.lstrip("+").startswith("model.path="):
            return arg.split("=", 1)[1] or None
    return None
