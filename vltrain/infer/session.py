"""What inference runs on: a model, its tokenizer and config, the engine, and where results go.

From a checkpoint (`checkpoint-<step>/`, LoRA or full, or a `-merged` folder): its saved config supplies the
model type, template, system and dtype; LoRA adapters go onto their base (`load_checkpoint`), or are merged first
(`merge_lora`, reusing an existing merge of the same checkpoint). Without a checkpoint: the model of the composed
config (`model=<type> model.path=<dir>`). On a machine with a CUDA GPU the model moves there.

`infer(cfg, options)` is what `vltrain infer` runs: an interactive chat, or the evaluation of held-out rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vltrain.config import ConfigError, TrainConfig
from vltrain.infer.engine import Engine

log = logging.getLogger(__name__)


@dataclass
class Session:
    model: object
    tokenizer: object
    cfg: TrainConfig
    engine: Engine
    ckpt_dir: Path | None
    result_dir: Path
    """`<ckpt>/infer_result`, `<model.path>/infer_result`, or `outputs/infer_result` for a random model."""


def place_on_device(model, device_map: str | dict | None = None):
    """`device_map`: None or "auto" -> the one CUDA GPU when there is one (several: accelerate's balanced map),
    else CPU; a device string -> that device; a dict -> accelerate's dispatch. 8-bit models stay where they are."""
    if getattr(model, "is_loaded_in_8bit", False):
        return model
    if isinstance(device_map, dict):
        from accelerate import dispatch_model

        return dispatch_model(model, device_map=device_map)
    if device_map in (None, "auto"):
        if torch.cuda.device_count() > 1:
            from accelerate import dispatch_model, infer_auto_device_map

            no_split = getattr(model, "_no_split_modules", None) or []
            return dispatch_model(model, infer_auto_device_map(model, no_split_module_classes=no_split))
        device_map = "cuda:0" if torch.cuda.is_available() else "cpu"
    return model.to(device_map)


def open_session(cfg: TrainConfig | None = None, ckpt_dir: str | Path | None = None, merge_lora: bool = False,
                 overwrite: bool = False, result_dir: str | Path | None = None,
                 device_map: str | dict | None = None, model_path: str | None = None) -> Session:
    """Load for inference: the checkpoint `ckpt_dir` (its config wins over `cfg`), else `cfg`'s model.
    `model_path`: the base of an ms-swift or official LoRA checkpoint whose records point somewhere absent."""
    from vltrain.model.adapters import is_lora_checkpoint
    from vltrain.model.load import load_checkpoint, load_model_tokenizer, make_encoder

    if ckpt_dir is not None:
        ckpt = Path(ckpt_dir).resolve()
        if not ckpt.is_dir():
            raise ConfigError(f"ckpt_dir={ckpt_dir}: no such folder")
        if merge_lora and is_lora_checkpoint(ckpt):
            from vltrain.model.export import merge_lora as merge

            ckpt = merge(ckpt, overwrite=overwrite, reuse=True, model_path=model_path)
        try:
            model, tokenizer, ckpt_cfg = load_checkpoint(ckpt, model_path)
        except FileNotFoundError as e:
            raise ConfigError(f"ckpt_dir: {e}") from None
        default_results = ckpt / "infer_result"
    else:
        if cfg is None:
            raise ConfigError("open_session needs a config or ckpt_dir")
        model, tokenizer = load_model_tokenizer(cfg.model)
        ckpt, ckpt_cfg = None, cfg
        default_results = Path(cfg.model.path) / "infer_result" if cfg.model.path and Path(
            cfg.model.path).is_dir() else Path("outputs") / "infer_result"
    model = place_on_device(model, device_map)
    model.eval()
    encoder = make_encoder(ckpt_cfg, model, tokenizer)
    return Session(model, tokenizer, ckpt_cfg, Engine(model, encoder), ckpt,
                   Path(result_dir) if result_dir else default_results)


# ---- `vltrain infer` -------------------------------------------------------------------------------------------


@dataclass
class InferOptions:
    ckpt_dir: str | None = None
    load_dataset_config: bool = False
    merge_lora: bool = False
    overwrite: bool = False
    result_dir: str | None = None
    batch_size: int = 8
    limit: int | None = None
    max_new_tokens: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    stop_words: list[str] = field(default_factory=list)

    def generation(self) -> dict:
        keys = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty")
        out = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        if self.stop_words:
            out["stop_words"] = list(self.stop_words)
        return out


def infer(cfg: TrainConfig, options: InferOptions, val_given: bool = False,
          model_path: str | None = None) -> dict | None:
    """Chat (the default), or score rows: the checkpoint's held-out split (`load_dataset_config`) or
    `cfg.dataset.val` (`val_given`: the command line named them). `model_path`: the base of a foreign (ms-swift,
    official) checkpoint, given on the command line. Returns the metrics of a scoring run."""
    if options.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {options.batch_size}")
    if options.load_dataset_config and not options.ckpt_dir:
        raise ConfigError("load_dataset_config=true needs ckpt_dir=<checkpoint> (the split is the checkpoint's)")
    session = open_session(cfg, options.ckpt_dir, options.merge_lora, options.overwrite, options.result_dir,
                           model_path=model_path)
    generation = options.generation()
    if options.load_dataset_config or val_given:
        import json

        from vltrain.infer.evaluate import evaluate, held_out_records

        if val_given:
            from vltrain.data.specs import read_spec

            records = [r for i, spec in enumerate(cfg.dataset.val)
                       for r in read_spec(spec, cfg.dataset.seed, key=f"dataset.val[{i}]")]
        else:
            records = held_out_records(session.cfg, session.ckpt_dir)
        generation.setdefault("max_new_tokens", session.cfg.eval.max_new_tokens)
        result = evaluate(session.engine, records, session.result_dir, options.batch_size, options.limit,
                          **generation)
        print(json.dumps(result.metrics, indent=2))
        print(f"[INFO] results: {result.result_file}\n[INFO] summary: {result.summary_file}")
        return result.metrics

    from vltrain.infer.chat import chat

    chat(session.engine, session.result_dir, merged_blocks=session.cfg.model.merge_image_blocks, generation=generation)
    return None
