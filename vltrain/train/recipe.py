"""`train(cfg)`: one fine-tuning run, top to bottom. Tests call it directly with a TrainConfig."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from pathlib import Path

import torch
from transformers import TrainingArguments, set_seed
from transformers.integrations import is_deepspeed_zero3_enabled

from vltrain.config import ConfigError, TrainConfig, run_config_yaml, training_defaults
from vltrain.context import process
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
from vltrain.model.load import (
    load_model,
    load_tokenizer_for,
    make_encoder,
    resolve_dtype,
    save_partitioned,
    weights_digest,
)
from vltrain.model.tuning import apply_sft, trainable_summary
from vltrain.progress import is_terminal
from vltrain.train import parallel
from vltrain.train.callbacks import JsonlLogger, LossPlot
from vltrain.train.checkpoint import check_world_size, clean_leftovers, rotate
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
    """Everything a run needs, in order: arguments (DeepSpeed's config among them, so that ZeRO-3 partitions the
    model as it is created), tokenizer and encoder, records (every one encoded once and checked, on rank 0),
    model, trainable parts, trainer. Rank 0 writes the run folder's config, DeepSpeed config and the base model
    (when randomly initialised). A bad record stops the run before any weights load (`data.on_error`); with
    `cfg.resume` the run continues from its newest complete checkpoint (`start_run`)."""
    world = process().world_size
    parallel.check_launch(cfg, world)
    parallel.init_process_group()
    cfg, run, point = start_run(cfg)
    run_dir = run.path
    try:
        args = build_training_arguments(cfg, run_dir, world, write=run.is_main)
    except ValueError as e:  # TrainingArguments' own consistency checks
        raise ConfigError(f"trainer: {str(e).strip().splitlines()[0]}") from None
    if point:
        check_world_size(point, world, zero=bool(args.deepspeed))
    if args.world_size != world:  # a multi-process launch silently training as independent processes
        raise ConfigError(f"{world} processes were started but the Trainer sees a world of {args.world_size} "
                          f"(parallel={cfg.parallel.name})")
    set_seed(args.seed)
    tokenizer = load_tokenizer_for(cfg.model)
    encoder = make_encoder(cfg, tokenizer=tokenizer)
    train_dataset, eval_dataset, val_records = prepare_data_once(cfg, encoder, run_dir)
    manifest = json.dumps(data_manifest([s.split("#")[0] for s in cfg.dataset.train + cfg.dataset.val],
                                        [r.key for r in val_records]), indent=1)
    if point and point.checkpoint:
        check_data(point, json.loads(manifest), cfg.resume_force)
        args.eval_on_start = False  # evaluated before; RNG and history continue from the checkpoint
    # torch's threads on the cores the DataLoader workers leave free. (Workers are not kept across epochs by
    # default: a kept iterator skips the draw from the torch RNG that each new one makes, so a run resumed
    # mid-epoch would see other dropout masks than the run it continues.)
    share_cores(args.dataloader_num_workers)

    # Full fine-tuning keeps fp32 master weights under mixed precision; LoRA trains fp32 adapters on a base
    # held in the compute dtype.
    compute_dtype = resolve_dtype(cfg.model.dtype)
    device_map = None
    if cfg.parallel.name == "device_map":
        device_map = functools.partial(parallel.device_map_for, cfg.model)
    model = load_model(cfg.model, tokenizer, dtype=compute_dtype if cfg.sft_type.name == "lora" else torch.float32,
                       seed=args.seed, device_map=device_map, convert_once=world > 1, sft=cfg.sft_type)
    if getattr(model, "hf_device_map", None):
        log.info("device map: %s", sorted(set(model.hf_device_map.values()), key=str))
    if (encoder.tile_size, encoder.image_tokens_per_tile) != vision_geometry(model):
        raise ConfigError(f"model '{cfg.model.name}': its config gives {vision_geometry(model)} (tile px, tokens "
                          f"per tile), model.arch says {(encoder.tile_size, encoder.image_tokens_per_tile)}")
    checkpoint_files = {}  # besides the run config and the data manifest
    if cfg.model.init == "random":
        # A random base is part of the run: save it so LoRA checkpoints reload onto the same weights, and (outside
        # ZeRO-3, whose partitioned init draws other numbers, and 8-bit) record how to rebuild it, so that a
        # checkpoint copied elsewhere still loads.
        base = run.base_model
        if is_deepspeed_zero3_enabled():
            save_partitioned(model, base, is_main=run.is_main)
        elif run.is_main:
            model.save_pretrained(base)
            if not cfg.model.load_in_8bit:  # the record rebuilds the unquantised weights
                run.write_text(BASE_RECORD, json.dumps({"seed": args.seed, "dtype": str(model.dtype).split(".")[-1],
                                                        "sha256": weights_digest(model)}))
        if run.is_main:
            tokenizer.save_pretrained(base)
        parallel.wait_for_all(cfg.parallel.wait_minutes)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init="pretrained", path=str(base)))
    if (run.path / BASE_RECORD).is_file():
        checkpoint_files[BASE_RECORD] = (run.path / BASE_RECORD).read_text(encoding="utf-8")
    # adapter_config.json names the base that plain peft loads: the hub id or folder as given, the random base
    base_name = cfg.model.path if not Path(cfg.model.path).exists() else str(Path(cfg.model.path).resolve())
    model.config._name_or_path = model.name_or_path = base_name
    set_seed(args.seed)  # LoRA's initial weights: the same whether the base was built here or read back (resume)
    model = apply_sft(model, cfg.sft_type)
    if is_deepspeed_zero3_enabled():  # parameters are partitioned: count their full sizes
        sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
        log.info("trainable %s / %s (ZeRO-3, partitioned over %d processes)",
                 f"{sum(n for n, t in sizes if t):,}", f"{sum(n for n, _ in sizes):,}", world)
    else:
        log.info("%s", trainable_summary(model))

    run_config = run_config_yaml(cfg)
    run.write_text(RUN_CONFIG, run_config)
    log.info("train rows %d, held-out rows %d, run folder %s", len(train_dataset), len(val_records), run_dir)
    step = point.step if point else None

    trainer = VLTrainer(
        model=model,
        args=args,
        train_dataset=SeededSamples(train_dataset, args.seed, train_dataset.where),
        eval_dataset=eval_dataset,
        # tiles cross from the workers as uint8 and are normalised on the device (`VLTrainer._prepare_inputs`)
        data_collator=IndexedCollator(Collator(tokenizer.pad_token_id, packing=cfg.data.packing,
                                               normalise_tiles=False)),
        processing_class=tokenizer,
        callbacks=[RunShape(world, cfg.global_batch_size),
                   JsonlLogger(run_dir, resume_step=step if run.is_main else None), LossPlot(run_dir),
                   PreemptionCheckpoint()],
        encoder=encoder,
        answer_set=val_records[: cfg.eval.generate_samples],
        max_new_tokens=cfg.eval.max_new_tokens,
        checkpoint_files={**checkpoint_files, RUN_CONFIG: run_config, MANIFEST_FILE: manifest},
        resume_only_model=cfg.resume_only_model,
        on_nonfinite=cfg.on_nonfinite,
        parallel=cfg.parallel.name,
        loss_reduction=cfg.loss_reduction,
        router_aux_coef=cfg.router_aux_loss_coef or 0.0,
    )
    trainer.resume_checkpoint = str(point.checkpoint) if point and point.checkpoint else None
    return trainer


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


def prepare_data_once(cfg: TrainConfig, encoder: Encoder, run_dir: Path):
    """`prepare_data` on rank 0 first (reading the records, hub downloads, the data check; with `data.encode=
    datasets` the encoding into the cache), then on each other node's local rank 0 (which encodes into its own
    cache folder when that is not shared with rank 0), then on the remaining ranks, which open their node's entry.
    All take rank 0's verdict on bad rows instead of checking again, and wait up to `parallel.wait_minutes`,
    whatever the collective timeout."""
    minutes = cfg.parallel.wait_minutes
    verdict = None
    result = None
    with parallel.rank0_first(minutes) as first:
        if first:
            try:
                result = prepare_data(cfg, encoder, run_dir)
                verdict = ("ok", result[3])  # (bad row keys, tokens per record key)
            except ConfigError as e:  # DataError among them: every rank stops with the same message
                verdict = ("error", e)
    verdict = parallel.broadcast_from_rank0(verdict, minutes)
    if verdict[0] == "error":
        raise verdict[1]
    # Then each node's first process before the rest of its node: where the encode cache folder is not shared
    # with rank 0 (no shared filesystem) a node encodes once, not once per rank; a shared one opens rank 0's entry.
    with parallel.rank0_first(minutes, local=True) as first:
        if first and result is None:
            result = prepare_data(cfg, encoder, run_dir, write_skipped=False, verdict=verdict[1])
    if result is None:
        result = prepare_data(cfg, encoder, run_dir, write_skipped=False, verdict=verdict[1])
    return result[:3]


def prepare_data(cfg: TrainConfig, encoder: Encoder, run_dir: Path, write_skipped: bool = True,
                 verdict: tuple[set, dict] | None = None):
    """(train dataset, eval dataset or None, held-out records, verdict): every record read and encoded once,
    problems handled by `data.on_error` (raise: DataError listing all; skip: rows left out, listed in
    skipped_rows.jsonl, written when `write_skipped`). The verdict is (keys of the bad rows, tokens per record
    key); given, the check already ran elsewhere (rank 0) and is applied without encoding the records again.

    `data.encode=datasets` keeps this first encoding (HF datasets, in `data.encode_cache` under a fingerprint, so
    a rerun on the same data encodes nothing) and serves samples from it; `lazy` encodes again in the DataLoader
    workers. The check's token counts give the datasets their `lengths` (length grouping, packing); with
    `data.packing` the training split is served as packs (`PackedDataset`).
    """
    read_errors: list[RecordError] = []
    train_records, val_records = load_splits(cfg.dataset, errors=read_errors)  # hub datasets behind a file lock
    splits = {"train": train_records, "val": val_records}
    start = time.perf_counter()
    unique = list({id(r): r for rs in splits.values() for r in rs}.values())
    if cfg.data.encode == "datasets":  # on the ranks after the first, this opens the cache rank 0 wrote
        cache = Path(cfg.data.encode_cache or dataset_module.DEFAULT_ENCODE_CACHE).expanduser()
        encoded = encode_with_datasets(unique, encoder, cache, cfg.data.num_proc, cfg.data.encode_cache_max_gb)
        row_of = {id(r): i for i, r in enumerate(unique)}
    if verdict is not None:
        bad, tokens = verdict
    else:
        if cfg.data.encode == "datasets":
            sizes = encoded.select_columns(["input_ids", "labels", "tiles_per_image", "error"])  # not the pixels
            outcomes = {id(r): outcome_from_encoded_row(row) for r, row in zip(unique, sizes)}
        else:
            outcomes = dict(zip([id(r) for r in unique], iter_outcomes(unique, encoder, cfg.data.num_proc)))
        report = check_splits(splits, encoder, read_errors=read_errors, outcomes=outcomes)
        log.info("data check: %d records encoded in %.1fs (data.num_proc=%d)\n%s",
                 len(train_records) + len(val_records), time.perf_counter() - start, cfg.data.num_proc,
                 report.format(problems=False))
        bad = enforce(report, cfg.data.on_error, run_dir if write_skipped else None)
        tokens = {r.key: outcomes[id(r)].tokens for r in unique}
    train_records = [r for r in train_records if r.key not in bad]
    val_records = [r for r in val_records if r.key not in bad]
    if not train_records:
        raise DataError("no training rows left after leaving out the bad ones")

    def make(records):
        lengths = [tokens[r.key] for r in records]
        if cfg.data.encode == "datasets":
            return PreEncodedDataset(encoded, [row_of[id(r)] for r in records], lengths)
        return EncodedDataset(records, encoder, lengths)

    train_dataset = make(train_records)
    where = [r.where() for r in train_records]  # `file:line` of each training row, for messages about a batch
    if cfg.data.packing:
        train_dataset = PackedDataset(train_dataset, train_dataset.lengths, cfg.data.max_length)
        where = [", ".join(where[i] for i in group) for group in train_dataset.groups]
        log.info("data.packing: %d training records in %d packs of up to %d tokens (%.1f%% of the tokens real)",
                 len(train_records), len(train_dataset), cfg.data.max_length,
                 100 * sum(train_dataset.lengths) / (len(train_dataset) * cfg.data.max_length))
    train_dataset.where = where
    return train_dataset, (make(val_records) if val_records else None), val_records, (set(bad), tokens)


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
