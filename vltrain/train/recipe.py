"""`train(cfg)`: one fine-tuning run. `build_trainer` reads top to bottom, one named step per line; the steps follow
it in the order they run. `cfg` is resolved (`vltrain.config.resolve_config`): a resumed run's config is already
its saved one. Tests call `train` / `build_trainer` directly."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from pathlib import Path

import torch
from transformers import TrainingArguments, set_seed
from transformers.integrations import is_deepspeed_zero3_enabled

from vltrain.config import ConfigError, TrainConfig, run_config_yaml, training_defaults
from vltrain.context import process
from vltrain.data.collator import Collator
from vltrain.data.encode import Encoder
from vltrain.data.records import Record
from vltrain.manifest import (
    BASE_RECORD,
    MANIFEST_FILE,
    RUN_CONFIG,
    ResumePoint,
    data_manifest,
    find_resume_point,
    manifest_changes,
    read_manifest,
)
from vltrain.model.geometry import vision_geometry
from vltrain.model.load import load_model, make_encoder
from vltrain.model.placement import resolve_dtype
from vltrain.model.save import save_partitioned, weights_digest
from vltrain.model.tuning import apply_sft, trainable_summary
from vltrain.model.vocab import load_tokenizer_for
from vltrain.progress import is_terminal
from vltrain.speed import share_cores
from vltrain.train import parallel
from vltrain.train.callbacks import JsonlLogger, LossPlot
from vltrain.train.checkpoint import check_world_size, clean_leftovers, rotate, set_aside_later
from vltrain.train.data import prepare_data_once
from vltrain.train.loss import router_aux_coef
from vltrain.train.order import IndexedCollator, SeededSamples
from vltrain.train.preempt import PreemptionCheckpoint, RunShape
from vltrain.train.run import RunFolder
from vltrain.train.trainer import VLTrainer

log = logging.getLogger(__name__)


def train(cfg: TrainConfig) -> dict[str, float]:
    """Train as configured (`cfg.resume`: continue a run); returns the final metrics (train loss, and eval loss /
    exact match when held out)."""
    trainer = build_trainer(cfg)
    result = trainer.train(resume_from_checkpoint=trainer.resume_checkpoint)
    metrics = {"train_loss": result.training_loss, "global_step": result.global_step}
    preemption = next(c for c in trainer.callback_handler.callbacks if isinstance(c, PreemptionCheckpoint))
    if preemption.preempted:  # checkpoint saved; the requeued job resumes from it
        trainer.save_state()
        return metrics | {"preempted": True}
    # When the last step was just evaluated, report that evaluation rather than run it again.
    final_eval = {k: v for h in trainer.state.log_history if h.get("step") == result.global_step
                  for k, v in h.items() if k.startswith("eval_")}
    if final_eval:
        metrics |= final_eval
    elif trainer.eval_dataset is not None:
        metrics |= trainer.evaluate()
    trainer.save_state()
    return metrics


def build_trainer(cfg: TrainConfig) -> VLTrainer:
    """Everything a run needs, in order. Arguments come first (DeepSpeed's config among them, so that ZeRO-3
    partitions the model as it is created); every record is encoded once and checked (on rank 0) before any weight
    loads, so a bad record stops the run early (`data.on_error`). Rank 0 writes the run folder's files."""
    world = process().world_size
    parallel.check_launch(cfg, world)
    parallel.init_process_group(solo=parallel.uses_deepspeed(cfg))
    cfg, run, point = start_run(cfg)
    args = training_arguments(cfg, run, point, world)
    set_seed(args.seed)
    tokenizer = load_tokenizer_for(cfg.model)
    encoder = make_encoder(cfg, tokenizer=tokenizer)
    train_dataset, eval_dataset, val_records = prepare_data_once(cfg, encoder, run.path)
    manifest = check_resumed_data(cfg, val_records, point, args)
    # torch's threads on the cores the DataLoader workers leave free. (Workers are not kept across epochs by
    # default: a kept iterator skips the draw from the torch RNG that each new one makes, so a run resumed
    # mid-epoch would see other dropout masks than the run it continues.)
    share_cores(args.dataloader_num_workers)
    model = load_base_model(cfg, tokenizer, encoder, args.seed, world)
    cfg, run_files = keep_random_base(cfg, run, model, tokenizer, args.seed)
    model = tune(cfg, model, args.seed, world)
    run_config = run_config_yaml(cfg)
    run.write_text(RUN_CONFIG, run_config)
    run_files |= {RUN_CONFIG: run_config, MANIFEST_FILE: manifest}
    log.info("train rows %d, held-out rows %d, run folder %s", len(train_dataset), len(val_records), run.path)
    return make_trainer(cfg, run, point, args, model, tokenizer, encoder, train_dataset, eval_dataset,
                        val_records, run_files)


# ---- the steps, in order -----------------------------------------------------------------------------------------


def start_run(cfg: TrainConfig) -> tuple[TrainConfig, RunFolder, ResumePoint | None]:
    """(the config with what only the model's files decide written down, the run folder, where to resume or None)
    of a resolved config (`config.resolve_config` refused a folder holding another run, and gave a resumed run its
    saved config). Checks what needs no data or weights: `data.max_length` fits the model's positions. Clears what
    a killed run left half-written, and finishes its rotation."""
    point = None
    if cfg.resume:
        point = find_resume_point(cfg.resume, cfg.run_dir)
        log.info("resuming %s from %s", point.run_dir, point.checkpoint or "step 0 (no complete checkpoint yet)")
    check_max_length(cfg)
    cfg = resolve_router_aux(cfg)
    run = RunFolder.for_config(cfg)
    run.create()
    if run.is_main:
        clean_leftovers(run.path)
        if point:  # a later `resume=auto` (a requeued job) must continue this branch, not the one it replaces
            set_aside_later(run.path, point.step)
        # a kill between publishing a checkpoint and rotating left one too many
        rotate(run.path, cfg.trainer.get("save_total_limit"), keep=[point.checkpoint if point else None])
    return cfg, run, point


def declared_llm_config(cfg: TrainConfig) -> dict:
    """The LLM's config as the model declares it, before any weight loads: `model.arch.llm` of a random model,
    else the `text_config` (HF-native) or `llm_config` (original layout) of its config.json; {} when unreadable
    (the model loader then says what is wrong with the folder)."""
    if cfg.model.init == "random":
        return cfg.model.arch.get("llm", {})
    from vltrain.model.hub import resolve_model_path

    config_file = resolve_model_path(cfg.model.path, cfg.model.hub, cfg.model.hub_token,
                                     files=["config.json"]) / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config.get("text_config") or config.get("llm_config") or {}


def resolve_router_aux(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with the router-loss coefficient of an MoE LLM decided (`vltrain.train.loss.router_aux_coef`) and
    written down, so that the run config (and a resumed run) keeps it whatever the saved base's config says."""
    llm = declared_llm_config(cfg)
    if llm.get("model_type") not in ("qwen3_moe", "gpt_oss"):
        return cfg
    coef = router_aux_coef(llm, cfg.router_aux_loss_coef)
    log.info("MoE LLM (%s): router load-balancing loss %s", llm["model_type"],
             f"added with coefficient {coef}" if coef else "not added")
    return dataclasses.replace(cfg, router_aux_loss_coef=coef)


def check_max_length(cfg: TrainConfig) -> None:
    """`data.max_length` within the positions the LLM was built for (rope scaling included), from its config."""
    llm = declared_llm_config(cfg)
    limit = llm.get("max_position_embeddings")
    if not isinstance(limit, int):
        return
    scaling = llm.get("rope_scaling") or {}
    factor = scaling.get("factor", 1.0) if isinstance(scaling, dict) else 1.0
    limit = int(limit * max(1.0, factor or 1.0))
    if cfg.data.max_length > limit:
        raise ConfigError(f"data.max_length={cfg.data.max_length} exceeds the {limit} positions of model "
                          f"'{cfg.model.name}' (max_position_embeddings of its LLM)")


def training_arguments(cfg: TrainConfig, run: RunFolder, point: ResumePoint | None, world: int) -> TrainingArguments:
    """`build_training_arguments`, refusing what does not fit this launch: a resumed checkpoint of another world
    size (ZeRO), a Trainer that sees another world than the processes started."""
    try:
        args = build_training_arguments(cfg, run.path, world, write=run.is_main)
    except ValueError as e:  # TrainingArguments' own consistency checks
        raise ConfigError(f"trainer: {str(e).strip().splitlines()[0]}") from None
    parallel.set_collective_timeout(args.ddp_timeout)
    if point:
        check_world_size(point, world, zero=bool(args.deepspeed))
    if args.world_size != world:  # a multi-process launch silently training as independent processes
        raise ConfigError(f"{world} processes were started but the Trainer sees a world of {args.world_size} "
                          f"(parallel={cfg.parallel.name})")
    return args


def check_resumed_data(cfg: TrainConfig, val_records: list[Record], point: ResumePoint | None,
                       args: TrainingArguments) -> str:
    """The run's data manifest (JSON); a resumed run must read the record files and the held-out split its
    checkpoint recorded (`resume_force` continues anyway, with a warning)."""
    manifest = json.dumps(data_manifest([s.split("#")[0] for s in cfg.dataset.train + cfg.dataset.val],
                                        [r.key for r in val_records]), indent=1)
    if point and point.checkpoint:
        saved = read_manifest(point.checkpoint)
        changes = manifest_changes(saved, json.loads(manifest)) if saved else []
        if changes and not cfg.resume_force:
            raise ConfigError(f"resume: the data changed since {point.checkpoint.name}: {'; '.join(changes)}; "
                              "resume_force=true continues anyway")
        if changes:
            log.warning("resuming although the data changed since %s: %s", point.checkpoint.name,
                        "; ".join(changes))
        args.eval_on_start = False  # evaluated before; RNG and history continue from the checkpoint
    return manifest


def load_base_model(cfg: TrainConfig, tokenizer, encoder: Encoder, seed: int, world: int):
    """The base model in the dtype the run trains it in (full fine-tuning keeps fp32 master weights under mixed
    precision; LoRA trains fp32 adapters on a base held in the compute dtype), placed by `parallel`; its tile
    geometry must be the encoder's."""
    compute_dtype = resolve_dtype(cfg.model.dtype)
    device_map = None
    if cfg.parallel.name == "device_map":
        device_map = functools.partial(parallel.device_map_for, cfg.model)
    model = load_model(cfg.model, tokenizer, dtype=compute_dtype if cfg.sft_type.name == "lora" else torch.float32,
                       seed=seed, device_map=device_map, convert_once=world > 1, sft=cfg.sft_type)
    if getattr(model, "hf_device_map", None):
        log.info("device map: %s", sorted(set(model.hf_device_map.values()), key=str))
    if (encoder.tile_size, encoder.image_tokens_per_tile) != vision_geometry(model):
        raise ConfigError(f"model '{cfg.model.name}': its config gives {vision_geometry(model)} (tile px, tokens "
                          f"per tile), model.arch says {(encoder.tile_size, encoder.image_tokens_per_tile)}")
    return model


def keep_random_base(cfg: TrainConfig, run: RunFolder, model, tokenizer, seed: int) -> tuple[TrainConfig, dict]:
    """A random base is part of the run: saved into the run folder so LoRA checkpoints reload onto the same weights,
    and (outside ZeRO-3, whose partitioned init draws other numbers, and 8-bit) recorded in `base_model.json`, so
    that a checkpoint copied elsewhere still loads. Returns the config naming that folder as the pretrained base,
    and the run files every checkpoint gets (the record)."""
    if cfg.model.init == "random":
        base = run.base_model
        if is_deepspeed_zero3_enabled():
            save_partitioned(model, base, is_main=run.is_main)
        elif run.is_main:
            model.save_pretrained(base)
            if not cfg.model.load_in_8bit:  # the record rebuilds the unquantised weights
                run.write_text(BASE_RECORD, json.dumps({"seed": seed, "dtype": str(model.dtype).split(".")[-1],
                                                        "sha256": weights_digest(model)}))
        if run.is_main:
            tokenizer.save_pretrained(base)
        parallel.wait_for_all(cfg.parallel.wait_minutes)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init="pretrained", path=str(base)))
    files = {}
    if (run.path / BASE_RECORD).is_file():
        files[BASE_RECORD] = (run.path / BASE_RECORD).read_text(encoding="utf-8")
    return cfg, files


def tune(cfg: TrainConfig, model, seed: int, world: int):
    """The trainable parts (`sft_type`: LoRA adapters, or the unfrozen parts), seeded so that LoRA's initial weights
    are the same whether the base was built here or read back (resume)."""
    # adapter_config.json names the base that plain peft loads: the hub id or folder as given, the random base
    base_name = cfg.model.path if not Path(cfg.model.path).exists() else str(Path(cfg.model.path).resolve())
    model.config._name_or_path = model.name_or_path = base_name
    set_seed(seed)
    model = apply_sft(model, cfg.sft_type)
    if is_deepspeed_zero3_enabled():  # parameters are partitioned: count their full sizes
        sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
        log.info("trainable %s / %s (ZeRO-3, partitioned over %d processes)",
                 f"{sum(n for n, t in sizes if t):,}", f"{sum(n for n, _ in sizes):,}", world)
    else:
        log.info("%s", trainable_summary(model))
    return model


def make_trainer(cfg: TrainConfig, run: RunFolder, point: ResumePoint | None, args: TrainingArguments, model,
                 tokenizer, encoder: Encoder, train_dataset, eval_dataset, val_records: list[Record],
                 run_files: dict[str, str]) -> VLTrainer:
    """The Trainer over the run's data in (seed, epoch) order, with vltrain's callbacks; `run_files` go into every
    checkpoint. `resume_checkpoint`: the checkpoint `train` continues, or None."""
    step = point.step if point else None
    trainer = VLTrainer(
        model=model,
        args=args,
        train_dataset=SeededSamples(train_dataset, args.seed, train_dataset.where),
        eval_dataset=eval_dataset,
        # tiles cross from the workers as uint8 and are normalised on the device (`speed.FastSteps`)
        data_collator=IndexedCollator(Collator(tokenizer.pad_token_id, packing=cfg.data.packing,
                                               normalise_tiles=False)),
        processing_class=tokenizer,
        callbacks=[RunShape(args.world_size, cfg.global_batch_size),
                   JsonlLogger(run.path, resume_step=step if run.is_main else None), LossPlot(run.path),
                   PreemptionCheckpoint()],
        encoder=encoder,
        answer_set=val_records[: cfg.eval.generate_samples],
        max_new_tokens=cfg.eval.max_new_tokens,
        checkpoint_files=run_files,
        resume_only_model=cfg.resume_only_model,
        on_nonfinite=cfg.on_nonfinite,
        parallel=cfg.parallel.name,
        loss_reduction=cfg.loss_reduction,
        router_aux_coef=cfg.router_aux_loss_coef or 0.0,
    )
    trainer.resume_checkpoint = str(point.checkpoint) if point and point.checkpoint else None
    return trainer


def build_training_arguments(cfg: TrainConfig, run_dir: Path, world_size: int,
                             write: bool = False) -> TrainingArguments:
    """TrainingArguments from the `trainer` block and the `parallel` mode; built before the model (ZeRO-3
    partitions at load time). `write`: this process writes the run folder's deepspeed.json."""
    kwargs = training_defaults(cfg, world_size) | parallel.training_arguments(cfg, run_dir, write)
    has_val = bool(cfg.dataset.val) or cfg.dataset.val_ratio > 0
    if not has_val:
        kwargs["eval_strategy"] = "no"
    on_gpu = torch.cuda.is_available()
    compute_dtype = resolve_dtype(cfg.model.dtype)
    kwargs.setdefault("bf16", on_gpu and compute_dtype == torch.bfloat16)
    kwargs.setdefault("fp16", on_gpu and compute_dtype == torch.float16)
    # accelerate never combines `use_cpu` with DeepSpeed; on CPU the shim in train/parallel.py picks gloo instead
    kwargs.setdefault("use_cpu", not on_gpu and "deepspeed" not in kwargs)
    if kwargs.get("activation_checkpointing"):
        # Non-reentrant checkpointing needs no input that requires grad, so frozen embeddings under LoRA work.
        kwargs.setdefault("activation_checkpointing_kwargs", {"use_reentrant": False})
    kwargs.setdefault("report_to", [] if cfg.logger.name == "none" else [cfg.logger.name])
    kwargs.setdefault("dataloader_multiprocessing_context",
                      parallel.data_worker_start(kwargs.get("dataloader_num_workers", 0)))
    # Off a terminal (a log file, CI, a cluster job) the Trainer's bars would fill the log with carriage returns;
    # it then prints each logged step as one line instead.
    kwargs.setdefault("disable_tqdm", not is_terminal())
    if cfg.logger.name == "wandb":
        os.environ.setdefault("WANDB_PROJECT", cfg.logger.project)
    return TrainingArguments(
        output_dir=str(run_dir),
        remove_unused_columns=False,  # samples are dataclasses; the collator builds the model inputs
        **kwargs,
    )
