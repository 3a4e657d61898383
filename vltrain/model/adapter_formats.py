"""Reading the LoRA checkpoints of ms-swift and the official InternVL scripts (`foreign_format`, `read_foreign`)
into `Lora` weights on the ORIGINAL `InternVLChatModel` module names; `vltrain.model.adapters` maps them onto
the native model. A file or setting that cannot be read exactly is an AdapterError naming it.

Foreign checkpoints read (each a folder; all name the ORIGINAL `InternVLChatModel` modules):
- ms-swift 2.x / 3.x peft adapters: `adapter_config.json` + `adapter_model.safetensors|bin`, keys
  `base_model.model.language_model.model.layers.{i}.attention.wqkv.lora_A.weight`, with `sft_args.json` (2.x) or
  `args.json` (3.x); any `target_modules` (the per-family lists, the 2.3+ regex, `ALL`, 3.x regexes);
- ms-swift 2.x `--tuner_backend swift`: `default/adapter_config.json` (`swift_type: LORA`) and un-prefixed keys
  carrying the adapter name (`...wqkv.lora_A.default.weight`);
- official whole-model checkpoints (`use_llm_lora` / `use_backbone_lora` in config.json): every weight, targeted
  linears as `language_model.base_model.model.<m>.base_layer.weight` + `<m>.lora_A.default.weight`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vltrain.config import ConfigError

SWIFT_RECORDS = ("sft_args.json", "args.json")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|"
                       r"lora_magnitude_vector)(?:\.(?P<adapter>[^.]+))?(?:\.weight)?$")
_UNSUPPORTED = {"use_qa_lora": "QA-LoRA", "use_merged_linear": "merged linear layers",
                "fan_in_fan_out": "fan_in_fan_out (Conv1D weights)", "layer_replication": "layer replication",
                "lora_bias": "a lora_B bias"}


class AdapterError(ConfigError):
    """A foreign adapter that cannot be read or represented exactly; the message names the file and the key."""


@dataclass
class Lora:
    """LoRA weights by module name in one layout (original or native), with the settings that give their scale."""

    modules: dict[str, dict[str, torch.Tensor]]
    """module -> {"lora_A": (r, in), "lora_B": (out, r), ["lora_magnitude_vector": (out,)]}"""
    r: int
    alpha: float
    dropout: float = 0.05
    use_rslora: bool = False
    use_dora: bool = False
    ranks: dict[str, int] = field(default_factory=dict)
    """module -> rank, where it differs from `r`"""
    alphas: dict[str, float] = field(default_factory=dict)
    """module -> alpha, where it differs from `alpha`"""
    trained: dict[str, torch.Tensor] = field(default_factory=dict)
    """weights trained in full next to the adapters (an unfrozen projector, peft `modules_to_save`), by key"""

    def scale(self, module: str) -> float:
        r, alpha = self.ranks.get(module, self.r), self.alphas.get(module, self.alpha)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


@dataclass
class ForeignCheckpoint:
    """A LoRA checkpoint written by ms-swift or the official scripts, read into original-layout names."""

    path: Path
    format: str
    """`ms-swift peft`, `ms-swift swift-backend` or `official`"""
    lora: Lora
    base_records: list[tuple[str, str]]
    """(where, recorded base path or hub id), in the order they are trusted"""
    model_type: str | None = None
    base_state: Mapping[str, torch.Tensor] | None = None
    """official: every non-LoRA tensor of the whole-model checkpoint, unwrapped to original names (read lazily)"""
    lora_base_keys: set[str] = field(default_factory=set)
    """official: the keys of `base_state` that came from peft's `base_layer` (must equal the base)"""
    dataset: list[str] = field(default_factory=list)


# ---- reading ----------------------------------------------------------------------------------------------------


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path}: not readable JSON ({e})") from None


def foreign_format(path: str | Path) -> str | None:
    """The foreign format of the folder `path`, or None (a vltrain checkpoint, a model folder, anything else)."""
    from vltrain.manifest import RUN_CONFIG
    from vltrain.model.original import is_original_layout

    path = Path(path)
    if not path.is_dir() or (path / RUN_CONFIG).is_file():
        return None
    if (path / "default" / "adapter_config.json").is_file():
        return "ms-swift swift-backend"
    if (path / "adapter_config.json").is_file():
        return "ms-swift peft"
    if is_original_layout(path):
        config = read_json(path / "config.json")
        if config.get("use_llm_lora") or config.get("use_backbone_lora"):
            return "official"
    return None


def _weights_file(folder: Path) -> Path:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise AdapterError(f"{folder}: no adapter_model.safetensors or adapter_model.bin")


def _lora_settings(config: dict, where: Path) -> dict:
    """r, alpha, dropout, rsLoRA, DoRA and per-module patterns of a peft (or swift) LoRA config; refuses what peft
    cannot express on the native model."""
    kind = config.get("peft_type") or config.get("swift_type") or "LORA"
    if str(kind).upper() != "LORA":
        raise AdapterError(f"{where}: peft_type {kind!r}: only LoRA adapters convert")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise AdapterError(f"{where}: {key}={config[key]!r}: {what} has no peft LoRA equivalent on the native "
                               "model")
    if (config.get("bias") or "none") != "none":
        raise AdapterError(f"{where}: bias={config['bias']!r}: trained biases next to LoRA are not converted")
    if config.get("layers_to_transform") is not None:
        raise AdapterError(f"{where}: layers_to_transform is set; convert an adapter whose keys name its layers")
    return {"r": int(config.get("r", 8)), "alpha": float(config.get("lora_alpha", 8)),
            "dropout": float(config.get("lora_dropout") or 0.0), "use_rslora": bool(config.get("use_rslora")),
            "use_dora": bool(config.get("use_dora")), "rank_pattern": dict(config.get("rank_pattern") or {}),
            "alpha_pattern": dict(config.get("alpha_pattern") or {})}


def pattern_value(patterns: dict, module: str):
    """peft's rule for rank_pattern / alpha_pattern keys: the first key that matches the end of the name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def _group(state: dict[str, torch.Tensor], where: Path, prefix: str = "") -> tuple[dict, dict]:
    """(module -> part -> tensor, other tensors) of a LoRA state dict whose keys start with `prefix`."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    other = {}
    for key, tensor in state.items():
        name = key.removeprefix(prefix) if key.startswith(prefix) else key
        m = _LORA_KEY.match(name)
        if m is None:
            other[name] = tensor
            continue
        parts = modules.setdefault(m["module"], {})
        if m["part"] in parts:
            raise AdapterError(f"{where}: {key}: several adapters on one module (only one adapter converts)")
        parts[m["part"]] = tensor
    for module, parts in modules.items():
        if "lora_embedding_A" in parts or "lora_embedding_B" in parts:
            raise AdapterError(f"{where}: {module}: LoRA on an embedding is not converted")
        if set(parts) - {"lora_magnitude_vector"} != {"lora_A", "lora_B"}:
            raise AdapterError(f"{where}: {module}: lora_A or lora_B is missing")
    return modules, other


def _lora(modules: dict, settings: dict) -> Lora:
    ranks = {m: int(v) for m in modules if (v := pattern_value(settings["rank_pattern"], m)) is not None}
    alphas = {m: float(v) for m in modules if (v := pattern_value(settings["alpha_pattern"], m)) is not None}
    lora = Lora(modules, settings["r"], settings["alpha"], settings["dropout"], settings["use_rslora"],
                settings["use_dora"], ranks, alphas)
    for module, parts in modules.items():
        if parts["lora_A"].shape[0] != lora.ranks.get(module, lora.r):
            raise AdapterError(f"{module}.lora_A: rank {parts['lora_A'].shape[0]}, the config says "
                               f"{lora.ranks.get(module, lora.r)}")
    return lora


def read_foreign(path: str | Path) -> ForeignCheckpoint:
    """The foreign LoRA checkpoint in the folder `path` (see the module docstring for the formats)."""
    from vltrain.model.convert import read_shard, shard_files

    path = Path(path)
    fmt = foreign_format(path)
    if fmt is None:
        raise AdapterError(f"{path}: not an ms-swift or official InternVL LoRA checkpoint (no adapter_config.json, "
                           "default/adapter_config.json, or config.json with use_llm_lora / use_backbone_lora)")
    if fmt == "official":
        return _read_official(path, read_shard, shard_files)
    folder = path / "default" if fmt == "ms-swift swift-backend" else path
    config = read_json(folder / "adapter_config.json")
    settings = _lora_settings(config, folder / "adapter_config.json")
    file = _weights_file(folder)
    state = read_shard(file)
    prefix = "base_model.model."
    modules, other = _group(state, file, prefix)
    if config.get("modules_to_save"):
        raise AdapterError(f"{folder / 'adapter_config.json'}: modules_to_save {config['modules_to_save']}: "
                           "full weights inside an adapter are not converted")
    if other:
        raise AdapterError(f"{file}: {len(other)} keys that are no LoRA weights: {', '.join(sorted(other)[:5])}")
    if not modules:
        raise AdapterError(f"{file}: no LoRA weights")
    unknown = [m for m in modules if not m.startswith(("language_model.", "vision_model.", "mlp1."))]
    if unknown:
        raise AdapterError(f"{file}: {unknown[0]}: not a module of the original InternVLChatModel layout (a vltrain "
                           "or other HF-native adapter loads with its own base)")
    records = []
    if config.get("base_model_name_or_path"):
        records.append(("adapter_config.json base_model_name_or_path", config["base_model_name_or_path"]))
    model_type = None
    dataset = []
    for name in SWIFT_RECORDS:
        if (path / name).is_file():
            args = read_json(path / name)
            for key in ("model_id_or_path", "model", "model_dir"):
                if isinstance(args.get(key), str):
                    records.append((f"{name} {key}", args[key]))
            model_type = model_type or args.get("model_type")
            dataset = dataset or [d for d in (args.get("dataset") or []) if isinstance(d, str)]
    if (path / "configuration.json").is_file():
        adapter_cfg = read_json(path / "configuration.json").get("adapter_cfg") or {}
        if isinstance(adapter_cfg.get("model_id_or_path"), str):
            records.append(("configuration.json adapter_cfg.model_id_or_path", adapter_cfg["model_id_or_path"]))
        model_type = model_type or adapter_cfg.get("model_type")
    return ForeignCheckpoint(path, fmt, _lora(modules, settings), records, model_type, dataset=dataset)


class _ShardTensors(Mapping):
    """Tensors by key, read from their safetensors shard only when asked for (an official checkpoint's base weights
    are as large as the model); tensors of `.bin` shards are held as torch.load memory-maps them."""

    def __init__(self):
        self._where: dict[str, tuple[Path, str] | torch.Tensor] = {}

    def add(self, key: str, source: tuple[Path, str] | torch.Tensor) -> None:
        self._where[key] = source

    def shard_of(self, key: str) -> str:
        source = self._where[key]
        return source[0].name if isinstance(source, tuple) else "in-memory"

    def __getitem__(self, key: str) -> torch.Tensor:
        source = self._where[key]
        if isinstance(source, torch.Tensor):
            return source
        from safetensors import safe_open

        with safe_open(str(source[0]), framework="pt") as f:
            return f.get_tensor(source[1])

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _read_official(path: Path, read_shard, shard_files) -> ForeignCheckpoint:
    """The whole-model checkpoint of the official trainer: peft-wrapped LLM (`language_model.base_model.model.`)
    and vision tower (`vision_model.base_model.model.`), LoRA as `<m>.lora_A.default.weight`, the targeted
    layers' own weights as `<m>.base_layer.<leaf>`; alpha = 2 r (the model class's wrap_llm_lora /
    wrap_backbone_lora). Only the LoRA tensors are read now; the others when they are compared or written."""
    from safetensors import safe_open

    config = read_json(path / "config.json")
    lora_state = {}
    base_state, lora_base_keys = _ShardTensors(), set()
    for file in shard_files(path):
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                entries = {key: (file, key) for key in f.keys()}
        else:
            entries = read_shard(file)
        for key, source in entries.items():
            name = key
            for part in ("language_model.", "vision_model."):
                if name.startswith(part + "base_model.model."):
                    name = part + name.removeprefix(part + "base_model.model.")
            if _LORA_KEY.match(name):
                lora_state[name] = source
                continue
            if ".base_layer." in name:
                name = name.replace(".base_layer.", ".")
                lora_base_keys.add(name)
            base_state.add(name, source)
    lazy = _ShardTensors()
    for name, source in lora_state.items():
        lazy.add(name, source)
    modules, _ = _group({name: lazy[name] for name in lora_state}, path)
    ranks, alphas = {}, {}
    llm_r, vision_r = int(config.get("use_llm_lora") or 0), int(config.get("use_backbone_lora") or 0)
    for module in modules:
        r = llm_r if module.startswith("language_model.") else vision_r
        if not r:
            raise AdapterError(f"{path}: {module} carries LoRA but config.json's use_"
                               f"{'llm' if module.startswith('language_model.') else 'backbone'}_lora is 0")
        ranks[module], alphas[module] = r, 2.0 * r
    r = llm_r or vision_r
    lora = Lora(modules, r, 2.0 * r, 0.05, ranks={m: v for m, v in ranks.items() if v != r},
                alphas={m: v for m, v in alphas.items() if v != 2.0 * r})
    records = [("config.json _name_or_path", config["_name_or_path"])] if config.get("_name_or_path") else []
    return ForeignCheckpoint(path, "official", lora, records, None, base_state, lora_base_keys)
