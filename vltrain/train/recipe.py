"""`train(cfg)`: one fine-tuning run, top to bottom. Tests call it directly with a TrainConfig."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from pathlib import Path

import torch
from transformers import TrainingArguments, set_seed

from vltrain.config import RUN_CONFIG, ConfigError, TrainConfig, training_defaults
from vltrain.data import dataset as dataset_module
from vltrain.data.check import DataError, check_splits, enforce, iter_outcomes, outcome_from_encoded_row
from vltrain.data.collator import Collator
from vltrain.data.dataset import (
    EncodedDataset,
    PackedDataset,
    PreEncodedDataset,
    encode_with_datasets,
    load_splits,
    share_cores,
)
from vltrain.data.encode import Encoder
from vltrain.data.records import RecordError
from vltrain.model.geometry import vision_geometry
from vltrain.model.load import load_model, load_tokenizer_for, make_encoder, resolve_dtype
from vltrain.model.tuning import apply_sft, trainable_summary
from vltrain.train.callbacks import CheckpointRunFiles, JsonlLogger, LossPlot
from vltrain.train.run import RunFolder, run_config_yaml
from vltrain.train.trainer import VLTrainer

log = logging.getLogger(__name__)


def train(cfg: TrainConfig) -> dict[str, float]:
    """Train as configured; returns the final metrics (train loss, and eval loss / exact match when held out)."""
    trainer = build_trainer(cfg)
    result = trainer.train()
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
    run = RunFolder.for_config(cfg)
    run.create()
    run_dir = run.path
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    args = build_training_arguments(cfg, run_dir, world_size)
    set_seed(args.seed)
    tokenizer = load_tokenizer_for(cfg.model)
    encoder = make_encoder(cfg, tokenizer=tokenizer)
    # data.encode=datasets: the main process encodes first, the other ranks then open its cache.
    encode_first = (args.main_process_first(local=False, desc="encoding the records")
                    if cfg.data.encode == "datasets" else contextlib.nullcontext())
    with encode_first:
        train_dataset, eval_dataset, val_records = prepare_data(cfg, encoder, run_dir,
                                                                write_skipped=args.process_index == 0)
    # Workers kept across epochs and evaluations (no restart at each epoch); torch's threads on the cores they
    # leave free.
    if "dataloader_persistent_workers" not in cfg.trainer and args.dataloader_num_workers > 0:
        args.dataloader_persistent_workers = True
    share_cores(args.dataloader_num_workers)

    # Full fine-tuning keeps fp32 master weights under mixed precision; LoRA trains fp32 adapters on a base
    # held in the compute dtype.
    compute_dtype = resolve_dtype(cfg.model.dtype)
    model = load_model(cfg.model, tokenizer, dtype=compute_dtype if cfg.sft_type.name == "lora" else torch.float32,
                       seed=args.seed)
    if (encoder.tile_size, encoder.image_tokens_per_tile) != vision_geometry(model):
        raise ConfigError(f"model '{cfg.model.name}': its config gives {vision_geometry(model)} (tile px, tokens "
                          f"per tile), model.arch says {(encoder.tile_size, encoder.image_tokens_per_tile)}")
    if cfg.model.init == "random":
        # A random base is part of the run: save it so LoRA checkpoints reload onto the same weights.
        base = run.base_model
        if run.is_main:
            model.save_pretrained(base)
            tokenizer.save_pretrained(base)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init="pretrained", path=str(base)))
    model = apply_sft(model, cfg.sft_type)
    log.info("%s", trainable_summary(model))

    run_config = run_config_yaml(cfg)
    run.write_text(RUN_CONFIG, run_config)
    log.info("train rows %d, held-out rows %d, run folder %s", len(train_dataset), len(val_records), run_dir)

    return VLTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=Collator(tokenizer.pad_token_id, packing=cfg.data.packing,
                               normalise_tiles=not torch.cuda.is_available()),  # GPU: uint8 to the device
        processing_class=tokenizer,
        callbacks=[JsonlLogger(run_dir), LossPlot(run_dir), CheckpointRunFiles(run_config)],
        encoder=encoder,
        answer_set=val_records[: cfg.eval.generate_samples],
        max_new_tokens=cfg.eval.max_new_tokens,
    )


def prepare_data(cfg: TrainConfig, encoder: Encoder, run_dir: Path, write_skipped: bool = True):
    """(train dataset, eval dataset or None, held-out records): every record read and encoded once, problems
    handled by `data.on_error` (raise: DataError listing all; skip: rows left out, listed in skipped_rows.jsonl,
    written when `write_skipped`).

    `data.encode=datasets` keeps this first encoding (HF datasets, in `data.encode_cache` under a fingerprint, so
    a rerun on the same data encodes nothing) and serves samples from it; `lazy` encodes again in the DataLoader
    workers. The check's token counts give the datasets their `lengths` (length grouping, packing); with
    `data.packing` the training split is served as packs (`PackedDataset`).
    """
    read_errors: list[RecordError] = []
    train_records, val_records = load_splits(cfg.dataset, errors=read_errors)
    splits = {"train": train_records, "val": val_records}
    start = time.perf_counter()
    unique = list({id(r): r for rs in splits.values() for r in rs}.values())
    if cfg.data.encode == "datasets":
        cache = Path(cfg.data.encode_cache or dataset_module.DEFAULT_ENCODE_CACHE).expanduser()
        encoded = encode_with_datasets(unique, encoder, cache, cfg.data.num_proc)
        row_of = {id(r): i for i, r in enumerate(unique)}
        sizes = encoded.select_columns(["input_ids", "labels", "tiles_per_image", "error"])  # not the pixels
        outcomes = {id(r): outcome_from_encoded_row(row) for r, row in zip(unique, sizes)}
    else:
        outcomes = dict(zip([id(r) for r in unique], list(iter_outcomes(unique, encoder, cfg.data.num_proc))))
    report = check_splits(splits, encoder, read_errors=read_errors, outcomes=outcomes)
    log.info("data check: %d records encoded in %.1fs (data.num_proc=%d)\n%s", len(train_records) + len(val_records),
             time.perf_counter() - start, cfg.data.num_proc, report.format(problems=False))
    bad = enforce(report, cfg.data.on_error, run_dir if write_skipped else None)
    train_records = [r for r in train_records if r.key not in bad]
    val_records = [r for r in val_records if r.key not in bad]
    if not train_records:
        raise DataError("no training rows left after leaving out the bad ones")

    def make(records):
        lengths = [outcomes[id(r)].tokens for r in records]
        if cfg.data.encode == "datasets":
            return PreEncodedDataset(encoded, [row_of[id(r)] for r in records], lengths)
        return EncodedDataset(records, encoder, lengths)

    train_dataset = make(train_records)
    if cfg.data.packing:
        train_dataset = PackedDataset(train_dataset, train_dataset.lengths, cfg.data.max_length)
        log.info("data.packing: %d training records in %d packs of up to %d tokens (%.1f%% of the tokens real)",
                 len(train_records), len(train_dataset), cfg.data.max_length,
                 100 * sum(train_dataset.lengths) / (len(train_dataset) * cfg.data.max_length))
    return train_dataset, (make(val_records) if val_records else None), val_records


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
