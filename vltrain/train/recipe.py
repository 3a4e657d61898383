"""`train(cfg)`: one fine-tuning run, top to bottom. Tests call it directly with a TrainConfig."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import torch
from transformers import TrainingArguments, set_seed

from vltrain.config import RUN_CONFIG, ConfigError, TrainConfig, training_defaults
from vltrain.data.check import DataError, check_splits, enforce, outcome_from_encoded_row
from vltrain.data.collator import Collator
from vltrain.data.dataset import (
    EncodedDataset,
    PreEncodedDataset,
    encode_with_datasets,
    load_splits,
)
from vltrain.data.encode import Encoder
from vltrain.data.records import RecordError
from vltrain.model.geometry import vision_geometry
from vltrain.model.load import (
    BASE_RECORD,
    load_model,
    load_tokenizer_for,
    make_encoder,
    resolve_dtype,
    weights_digest,
)
from vltrain.model.tuning import apply_sft, trainable_summary
from vltrain.train.callbacks import JsonlLogger, LossPlot
from vltrain.train.checkpoint import (
    MANIFEST_FILE,
    ResumePoint,
    check_world_size,
    checkpoint_step,
    clean_leftovers,
    data_manifest,
    find_resume_point,
    holds_run,
    manifest_changes,
    read_manifest,
    resumed_config,
    rotate,
)
from vltrain.train.order import IndexedCollator, SeededSamples
from vltrain.train.run import RunFolder, process_index, run_config_yaml
from vltrain.train.trainer import VLTrainer

log = logging.getLogger(__name__)


def train(cfg: TrainConfig) -> dict[str, float]:
    """Train as configured (`cfg.resume`: continue a run); returns the final metrics (train loss, and eval loss /
    exact match when held out)."""
    trainer = build_trainer(cfg)
    result = trainer.train(resume_from_checkpoint=trainer.resume_checkpoint)
    metrics = {"train_loss": result.training_loss, "global_step": result.global_step}
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
    """Everything a run needs, in order: arguments, tokenizer and encoder, records (every one encoded once and
    checked), model, trainable parts, trainer. Writes the run folder's config (and the base model, when it is
    randomly initialised). A bad record stops the run before any weights load (`data.on_error`)."""
    cfg, point = start_run(cfg)
    run = RunFolder.for_config(cfg)
    run_dir = run.path
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        args = build_training_arguments(cfg, run_dir, world_size)
    except ValueError as e:  # TrainingArguments' own consistency checks
        raise ConfigError(f"trainer: {str(e).strip().splitlines()[0]}") from None
    if point:
        check_world_size(point, world_size, zero=bool(args.deepspeed))
    set_seed(args.seed)
    tokenizer = load_tokenizer_for(cfg.model)
    encoder = make_encoder(cfg, tokenizer=tokenizer)
    # data.encode=datasets: the main process encodes first, the other ranks then open its cache.
    encode_first = (args.main_process_first(local=False, desc="encoding the records")
                    if cfg.data.encode == "datasets" else contextlib.nullcontext())
    with encode_first:
        train_dataset, eval_dataset, val_records = prepare_data(cfg, encoder, run_dir,
                                                                write_skipped=args.process_index == 0)
    manifest = json.dumps(data_manifest([s.split("#")[0] for s in cfg.dataset.train + cfg.dataset.val],
                                        [r.key for r in val_records]), indent=1)
    if point and point.checkpoint:
        check_data(point, json.loads(manifest), cfg.resume_force)
        args.eval_on_start = False  # evaluated before; RNG and history continue from the checkpoint

    # Full fine-tuning keeps fp32 master weights under mixed precision; LoRA trains fp32 adapters on a base
    # held in the compute dtype.
    compute_dtype = resolve_dtype(cfg.model.dtype)
    model = load_model(cfg.model, tokenizer, dtype=compute_dtype if cfg.sft_type.name == "lora" else torch.float32,
                       seed=args.seed)
    if (encoder.tile_size, encoder.image_tokens_per_tile) != vision_geometry(model):
        raise ConfigError(f"model '{cfg.model.name}': its config gives {vision_geometry(model)} (tile px, tokens "
                          f"per tile), model.arch says {(encoder.tile_size, encoder.image_tokens_per_tile)}")
    checkpoint_files = {}  # besides the run config and the data manifest
    if cfg.model.init == "random":
        # A random base is part of the run: save it so LoRA checkpoints reload onto the same weights, and record
        # how to rebuild it, so a checkpoint copied elsewhere still loads.
        base = run.base_model
        if run.is_main:
            model.save_pretrained(base)
            tokenizer.save_pretrained(base)
        run.write_text(BASE_RECORD, json.dumps({"seed": args.seed, "dtype": str(model.dtype).split(".")[-1],
                                                "sha256": weights_digest(model)}))
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init="pretrained", path=str(base)))
    if (run.path / BASE_RECORD).is_file():
        checkpoint_files[BASE_RECORD] = (run.path / BASE_RECORD).read_text(encoding="utf-8")
    # adapter_config.json names the base that plain peft loads: the hub id or folder as given, the random base
    base_name = cfg.model.path if not Path(cfg.model.path).exists() else str(Path(cfg.model.path).resolve())
    model.config._name_or_path = model.name_or_path = base_name
    set_seed(args.seed)  # LoRA's initial weights: the same whether the base was built here or read back (resume)
    model = apply_sft(model, cfg.sft_type)
    log.info("%s", trainable_summary(model))

    run_config = run_config_yaml(cfg)
    run.write_text(RUN_CONFIG, run_config)
    log.info("train rows %d, held-out rows %d, run folder %s", len(train_dataset), len(val_records), run_dir)
    step = checkpoint_step(point.checkpoint) if point and point.checkpoint else 0 if point else None

    trainer = VLTrainer(
        model=model,
        args=args,
        train_dataset=SeededSamples(train_dataset, args.seed, train_dataset.where),
        eval_dataset=eval_dataset,
        data_collator=IndexedCollator(Collator(tokenizer.pad_token_id)),
        processing_class=tokenizer,
        callbacks=[JsonlLogger(run_dir, resume_step=step if run.is_main else None), LossPlot(run_dir)],
        encoder=encoder,
        answer_set=val_records[: cfg.eval.generate_samples],
        max_new_tokens=cfg.eval.max_new_tokens,
        checkpoint_files={**checkpoint_files, RUN_CONFIG: run_config, MANIFEST_FILE: manifest},
        resume_only_model=cfg.resume_only_model,
        on_nonfinite=cfg.on_nonfinite,
        parallel=cfg.parallel.name,
    )
    trainer.resume_checkpoint = str(point.checkpoint) if point and point.checkpoint else None
    return trainer


def start_run(cfg: TrainConfig) -> tuple[TrainConfig, ResumePoint | None]:
    """(the config to train, where to resume or None). Checks what needs no data or weights: a new run never
    writes into a folder holding another run; `data.max_length` fits the model's positions; a resumed run keeps
    its saved config. Clears what a killed run left half-written, and finishes its rotation."""
    point = None
    if cfg.resume:
        point = find_resume_point(cfg.resume, cfg.run_dir)
        cfg = resumed_config(cfg, point)
        log.info("resuming %s from %s", point.run_dir, point.checkpoint or "step 0 (no complete checkpoint yet)")
    elif process_index() == 0 and holds_run(Path(cfg.run_dir)):  # other ranks may already see rank 0's files
        raise ConfigError(f"run folder {Path(cfg.run_dir).resolve()} already holds a run; continue it with "
                          "resume=auto (same hydra.run.dir) or resume=<that folder>, or choose another folder")
    check_max_length(cfg)
    run = RunFolder.for_config(cfg)
    run.create()
    if run.is_main:
        clean_leftovers(run.path)
        # a kill between publishing a checkpoint and rotating left one too many
        rotate(run.path, cfg.trainer.get("save_total_limit"), keep=[point.checkpoint if point else None])
    return cfg, point


def check_max_length(cfg: TrainConfig) -> None:
    """`data.max_length` within the positions the LLM was built for (rope scaling included), from its config."""
    if cfg.model.init == "random":
        llm = cfg.model.arch.get("llm", {})
    else:
        from vltrain.model.hub import resolve_model_path

        config_file = resolve_model_path(cfg.model.path, cfg.model.hub, cfg.model.hub_token,
                                         files=["config.json"]) / "config.json"
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return  # the model loader says what is wrong with the folder
        llm = config.get("text_config") or config.get("llm_config") or {}
    limit = llm.get("max_position_embeddings")
    if not isinstance(limit, int):
        return
    scaling = llm.get("rope_scaling") or {}
    factor = scaling.get("factor", 1.0) if isinstance(scaling, dict) else 1.0
    limit = int(limit * max(1.0, factor or 1.0))
    if cfg.data.max_length > limit:
        raise ConfigError(f"data.max_length={cfg.data.max_length} exceeds the {limit} positions of model "
                          f"'{cfg.model.name}' (max_position_embeddings of its LLM)")


def check_data(point: ResumePoint, manifest: dict, force: bool) -> None:
    """A resumed run reads the record files and the held-out split its checkpoint recorded."""
    saved = read_manifest(point.checkpoint)
    changes = manifest_changes(saved, manifest) if saved else []
    if not changes:
        return
    if not force:
        raise ConfigError(f"resume: the data changed since {point.checkpoint.name}: {'; '.join(changes)}; "
                          "resume_force=true continues anyway")
    log.warning("resuming although the data changed since %s: %s", point.checkpoint.name, "; ".join(changes))


def prepare_data(cfg: TrainConfig, encoder: Encoder, run_dir: Path, write_skipped: bool = True):
    """(train dataset, eval dataset or None, held-out records): every record read and encoded once, problems
    handled by `data.on_error` (raise: DataError listing all; skip: rows left out, listed in skipped_rows.jsonl,
    written when `write_skipped`).

    `data.encode=lazy` encodes again in the DataLoader workers; `datasets` keeps this first encoding (HF datasets,
    cached in the run folder under a fingerprint) and serves samples from it.
    """
    read_errors: list[RecordError] = []
    train_records, val_records = load_splits(cfg.dataset, errors=read_errors)
    splits = {"train": train_records, "val": val_records}
    start = time.perf_counter()
    if cfg.data.encode == "datasets":
        unique = list({id(r): r for rs in splits.values() for r in rs}.values())
        encoded = encode_with_datasets(unique, encoder, run_dir / "encoded", cfg.data.num_proc)
        row_of = {id(r): i for i, r in enumerate(unique)}
        sizes = encoded.select_columns(["input_ids", "labels", "tiles_per_image", "error"])  # not the pixels
        outcomes = {id(r): outcome_from_encoded_row(row) for r, row in zip(unique, sizes)}
        report = check_splits(splits, encoder, read_errors=read_errors, outcomes=outcomes)
    else:
        report = check_splits(splits, encoder, cfg.data.num_proc, read_errors)
    log.info("data check: %d records encoded in %.1fs (data.num_proc=%d)\n%s", len(train_records) + len(val_records),
             time.perf_counter() - start, cfg.data.num_proc, report.format(problems=False))
    bad = enforce(report, cfg.data.on_error, run_dir if write_skipped else None)
    train_records = [r for r in train_records if r.key not in bad]
    val_records = [r for r in val_records if r.key not in bad]
    if not train_records:
        raise DataError("no training rows left after leaving out the bad ones")
    if cfg.data.encode == "datasets":
        def make(records):
            return PreEncodedDataset(encoded, [row_of[id(r)] for r in records])
    else:
        def make(records):
            return EncodedDataset(records, encoder)
    train = make(train_records)
    train.where = [r.where() for r in train_records]  # `file:line` of each training row, for messages
    return train, (make(val_records) if val_records else None), val_records


def build_training_arguments(cfg: TrainConfig, run_dir: Path, world_size: int) -> TrainingArguments:
    """TrainingArguments from the `trainer` block; built before the model (ZeRO-3 partitions at load time)."""
    kwargs = training_defaults(cfg, world_size)
    has_val = bool(cfg.dataset.val) or cfg.dataset.val_ratio > 0
    if not has_val:
        kwargs["eval_strategy"] = "no"
    on_gpu = torch.cuda.is_available()
    compute_dtype = resolve_dtype(cfg.model.dtype)
    kwargs.setdefault("bf16", on_gpu and compute_dtype == torch.bfloat16)
    kwargs.setdefault("fp16", on_gpu and compute_dtype == torch.float16)
    kwargs.setdefault("use_cpu", not on_gpu)
    if kwargs.get("activation_checkpointing"):
        # Non-reentrant checkpointing needs no input that requires grad, so frozen embeddings under LoRA work.
        kwargs.setdefault("activation_checkpointing_kwargs", {"use_reentrant": False})
    kwargs.setdefault("report_to", [] if cfg.logger.name == "none" else [cfg.logger.name])
    if cfg.logger.name == "wandb":
        os.environ.setdefault("WANDB_PROJECT", cfg.logger.project)
    return TrainingArguments(
        output_dir=str(run_dir),
        remove_unused_columns=False,  # samples are dataclasses; the collator builds the model inputs
        **kwargs,
    )
