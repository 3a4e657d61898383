"""What the server answers with: one model on the device, its engine, and the names clients use for it.

Three ways to start (ServeOptions): a checkpoint (`ckpt_dir`, LoRA or full), the model of the config
(`model=<type> model.path=<dir>`), or several LoRA checkpoints of one base (`adapters={name: path}`), loaded once
as peft adapters of the base: each name selects its adapter, `served_model_name` the base without any.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from vltrain.config import ConfigError, TrainConfig
from vltrain.infer.engine import Engine
from vltrain.manifest import RUN_CONFIG
from vltrain.serve.options import ServeOptions

log = logging.getLogger(__name__)


@dataclass
class ServedModels:
    engine: Engine
    cfg: TrainConfig
    names: dict[str, str | None]
    """Served name -> the peft adapter it selects; None: the model as loaded, or the base with adapters off."""
    context_length: int
    """Most tokens of prompt plus reply."""
    created: int = field(default_factory=lambda: int(time.time()))
    mixed_batches: bool = False
    """Rows of different names may share one generate call (peft's `adapter_names`): every adapter's LoRA layers
    are in the language model, whose inputs are the batch's rows. LoRA on the projector or vision tower sees
    tiles instead, so there each name gets its own calls."""

    @property
    def takes_video(self) -> bool:
        return not self.cfg.model.merge_image_blocks

    def adapter_names(self, names: list[str]) -> list[str]:
        """peft's `adapter_names` of a mixed batch: each row's adapter, `__base__` for the base."""
        return [self.names[n] or "__base__" for n in names]

    def adapter_context(self, name: str):
        """A context in which the model generates as `name` (an adapter set active, or the adapters disabled)."""
        model = self.engine.model
        adapter = self.names[name]
        if not hasattr(model, "peft_config") or len(self.names) == 1:
            return contextlib.nullcontext()
        if adapter is None:
            return model.disable_adapter()
        model.set_adapter(adapter)
        return contextlib.nullcontext()


def load_served(cfg: TrainConfig, options: ServeOptions, model_path: str | None = None) -> ServedModels:
    """Load what `options` names onto the device (one GPU when there is one, else CPU). `model_path`: the base
    of an ms-swift or official LoRA checkpoint (`ckpt_dir`) whose records point somewhere absent."""
    from vltrain.infer.session import open_session

    if options.adapters:
        engine, ckpt_cfg, names = _load_adapters(options)
    else:
        session = open_session(cfg, options.ckpt_dir, merge_lora=options.merge_lora, model_path=model_path)
        engine, ckpt_cfg = session.engine, session.cfg
        names = {options.served_model_name or ckpt_cfg.model.name: None}
    text_config = getattr(engine.model.config, "text_config", engine.model.config)
    context = options.max_model_len or getattr(text_config, "max_position_embeddings", None) or 4096
    mixed = len(names) > 1 and _lora_in_llm_only(engine.model)
    log.info("serving %s (context %d tokens%s)", ", ".join(names), context,
             "; names mixed in one batch" if mixed else "")
    return ServedModels(engine, ckpt_cfg, names, context, mixed_batches=mixed)


def _lora_in_llm_only(model) -> bool:
    from peft.tuners.lora import LoraLayer

    from vltrain.model.tuning import part_of

    prefix = "base_model.model."
    layers = [name.removeprefix(prefix) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    return bool(layers) and all(part_of(name) == "llm" for name in layers)


def _load_adapters(options: ServeOptions):
    import yaml

    from vltrain.config import validate
    from vltrain.infer.session import place_on_device
    from vltrain.manifest import BASE_RECORD
    from vltrain.model.load import load_checkpoint, make_encoder

    folders = {}
    bases = {}
    for name, path in options.adapters.items():
        folder = Path(path).expanduser().resolve()
        if not (folder / "adapter_config.json").is_file() or not (folder / RUN_CONFIG).is_file():
            raise ConfigError(f"adapters.{name}={path}: not a vltrain LoRA checkpoint (needs adapter_config.json "
                              f"and {RUN_CONFIG})")
        saved = validate(yaml.safe_load((folder / RUN_CONFIG).read_text(encoding="utf-8")))
        record = folder / BASE_RECORD
        digest = json.loads(record.read_text(encoding="utf-8")).get("sha256") if record.is_file() else None
        bases[name] = (saved.model.name, saved.model.path, digest, saved.model.template)
        folders[name] = folder
    first = next(iter(folders))
    for name, base in bases.items():
        if base != bases[first]:
            raise ConfigError(f"adapters.{name}: trained on base {base[0]} at {base[1]}, but adapters.{first} on "
                              f"{bases[first][0]} at {bases[first][1]}; adapters served together share one base")
    base_name = options.served_model_name or bases[first][0]  # the base is served under this name
    if base_name in folders:
        source = "served_model_name" if options.served_model_name else f"model.name of adapters.{first}'s base"
        raise ConfigError(f"adapters.{base_name}: the adapter's name is the base model's served name "
                          f"{base_name!r} ({source}); rename the adapter or set served_model_name")
    try:
        model, tokenizer, ckpt_cfg = load_checkpoint(folders[first])
    except FileNotFoundError as e:
        raise ConfigError(f"adapters.{first}: {e}") from None
    names: dict[str, str | None] = {base_name: None}
    names[first] = "default"  # peft's name of the adapter load_checkpoint put on the base
    for k, (name, folder) in enumerate(folders.items()):
        if name != first:  # peft names free of the served names' characters
            model.load_adapter(str(folder), adapter_name=f"adapter_{k}")
            names[name] = f"adapter_{k}"
    model = place_on_device(model)
    model.eval()
    return Engine(model, make_encoder(ckpt_cfg, model, tokenizer)), ckpt_cfg, names
