"""Typed configuration: the dataclass schema, and the one resolution of a command's final config.

Every command takes the same overrides: `check_overrides` refuses a misspelt key before Hydra composes the YAML
of `vltrain/conf/` (with the closest valid key), and `resolve_config` turns the composed config into these
dataclasses: the command line, over the saved config of a resumed run, over the defaults, with a resume's refusal
rules and a new run's refusal of a folder that holds another run. `compose_config` / `compose_command` compose
and resolve without a Hydra job (the commands other than train, tests, the Python API); the train command
resolves what its Hydra job composed. An unknown key or a wrong type is one `ConfigError` that names the key and
suggests the closest valid one. Everything below the commands takes these dataclasses, never a DictConfig.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the YAML or the command line."""


@dataclass
class ModelConfig:
    name: str = "tiny"
    """Model type in hub spelling (`internvl2-8b`); names the run folder `outputs/<name>/...`."""
    path: str | None = None
    """Local folder or hub id of the weights. None with `init: random` builds the model from `arch`."""
    init: Literal["pretrained", "random"] = "pretrained"
    """`pretrained` loads weights from `path`; `random` builds `arch` with random weights (offline)."""
    tokenizer: str | None = None
    """Tokenizer folder. None: the one in `path`, or the embedded tiny tokenizer when `path` is None."""
    template: str = "Hermes-2"
    """Chat template: `internlm2-chat`, `Hermes-2`, `phi3-chat` (the official 1.5 / 2.0 formats), `internvl2_5`
    (2.5, 3, 3.5 with Qwen3) or `internvl3_5_gpt_oss` (3.5 with GPT-OSS, the harmony format)."""
    system: str | None = None
    """Default system message; a record's own `system` wins. None: the template's official default; "": no system
    block."""
    thinking: bool = False
    """InternVL3.5 thinking mode (template `internvl2_5`): the default system message becomes the official
    thinking prompt, which asks for `<think>...</think>` before the answer (trained and generated as ordinary
    text). A record's own `system` still wins; cannot be combined with `model.system`."""
    max_tiles: int = 12
    """Tile budget for one image (448 px tiles, thumbnail not counted); shared by a sample's images when
    `data.split_tile_budget`."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Compute dtype. auto: bf16 on a GPU that computes it natively (compute capability 8.0+, or ROCm), fp16 on an
    older GPU (V100, T4: bf16 there is emulated), fp32 on CPU; training and inference alike."""
    attn_impl: str = "sdpa"
    """Attention implementation passed to transformers (`sdpa`, `eager`, `flash_attention_2`)."""
    arch: dict[str, Any] = field(default_factory=dict)
    """Architecture for `init: random`: `vision` and `llm` keyword dicts for the transformers configs, plus
    top-level InternVLConfig keys (`downsample_ratio`, ...)."""
    hf_id: str | None = None
    """Hugging Face hub id of the published checkpoint (for the model table; downloads use `path`)."""
    ms_id: str | None = None
    """ModelScope id of the published checkpoint (for the model table; downloads use `path` with `hub`)."""
    hub: Literal["hf", "modelscope"] = "hf"
    """Where a `path` that is not a local folder is downloaded from: Hugging Face Hub or ModelScope."""
    hub_token: str | None = None
    """Access token for gated models. None: `HF_TOKEN` / `MODELSCOPE_API_TOKEN` from the environment."""
    load_in_8bit: bool = False
    """Load the LLM's linear layers in 8 bits through bitsandbytes (the int8 model type); the vision tower,
    projector and LM head stay in `dtype`. Trains with LoRA only."""
    drop_path_rate: float = 0.0
    """Stochastic depth in the vision tower while training, rising linearly to this rate over its layers
    (the official recipe uses 0.1 for the 300M tower and 0.4 for the 6B one)."""
    merge_image_blocks: bool = False
    """V1.5 types: all tiles of a sample's images go into ONE `<img>...</img>` block (their model card's form);
    InternVL2 types: one block per image."""
    device_max_memory: list[str] = field(default_factory=list)
    """parallel=device_map: memory to fill on each GPU, one value per device in order (`[15GB,15GB,15GB,15GB]`,
    ms-swift's `--device_max_memory`). Empty: every visible GPU, 90% of its memory."""
    device_map_config: str | dict[str, Any] | None = None
    """parallel=device_map: an explicit module -> device map (a JSON file or a mapping), ms-swift's
    `--device_map_config`; wins over `device_max_memory`."""

    def __post_init__(self):
        if self.init == "pretrained" and not self.path:
            raise ConfigError(f"model.path is required for model.init=pretrained (model '{self.name}')")
        from vltrain.data.templates import TEMPLATES

        if self.template not in TEMPLATES:
            raise ConfigError(f"model.template: '{self.template}' is not one of {', '.join(TEMPLATES)}"
                              f"{suggest(self.template, TEMPLATES)}")
        if self.thinking:
            if TEMPLATES[self.template].thinking_system is None:
                raise ConfigError(f"model.thinking=true: template '{self.template}' has no thinking mode (only "
                                  f"{', '.join(n for n, t in TEMPLATES.items() if t.thinking_system)})")
            if self.system is not None:
                raise ConfigError("model.thinking=true sets the system message to the thinking prompt; leave "
                                  "model.system unset (or write the system you want in model.system instead)")
        if self.max_tiles < 1:
            raise ConfigError(f"model.max_tiles must be >= 1, got {self.max_tiles}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"model.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")


@dataclass
class DatasetConfig:
    name: str = "custom"
    """Dataset name (for the record only)."""
    train: list[str] = field(default_factory=list)
    """Training data specs, mixed freely: record files (`.jsonl`, `.json`) or hub dataset names (`coco-en-2-mini`,
    `HF::name`, `MS::name`), each optionally `#N` to sample N rows (repeating when N exceeds the size, seeded)."""
    val: list[str] = field(default_factory=list)
    """Held-out files; when given, `val_ratio` is ignored."""
    val_ratio: float = 0.01
    """Fraction of `train` held out (at least one row) when `val` is empty; 0 disables evaluation."""
    seed: int = 42
    """Seed of the split and of `#N` sampling."""
    demo_root: str | None = None
    """When set, the built-in demo dataset is generated into this folder before loading."""

    def __post_init__(self):
        if not self.train and not self.demo_root:
            raise ConfigError("dataset.train is empty: pass dataset.train=[path/to/data.jsonl]")
        if not 0.0 <= self.val_ratio < 1.0:
            raise ConfigError(f"dataset.val_ratio must be in [0, 1), got {self.val_ratio}")


@dataclass
class DataConfig:
    max_length: int = 2048
    """Longest sequence in tokens AFTER image tokens are expanded; longer rows are an error."""
    on_error: Literal["raise", "skip"] = "raise"
    """What a bad row does before training: `raise` stops with every problem listed; `skip` leaves those rows
    out and reports how many and which."""
    split_tile_budget: bool = True
    """Several images in one sample share `model.max_tiles` (`max(1, max_tiles // n_images)` each, the official
    training rule); false gives every image the full budget (ms-swift 2.x)."""
    video_frames: int = 8
    """Frames read from each video (middle of equal segments), one tile each."""
    box_style: Literal["internvl", "swift"] = "internvl"
    """Grounding output: `internvl` = `<box>[[x1, y1, x2, y2]]</box>`; `swift` = `<box> [[x1, y1, x2, y2]] </box>`."""
    encode: Literal["lazy", "datasets"] = "datasets"
    """`datasets`: every record encoded once, up front, by the data check, into a cache (HF datasets, Arrow,
    `encode_cache`) that training reads back: no encoding per epoch, none at all on a rerun. `lazy`: the check
    encodes (sizes only kept) and DataLoader workers encode again in every epoch; for data whose tiles
    (0.6 MB per 448 px tile) do not fit the disk. Both give identical samples."""
    num_proc: int = 1
    """Processes that read and encode records for the check before training and for `encode: datasets`."""
    encode_cache: str | None = None
    """Folder of encoded records (`encode: datasets`), shared across runs: an entry is keyed by the records, their
    media files (path, size, mtime), the encoder's settings, the tokenizer, the encoding code and library versions,
    so a rerun on the same data opens it instead of encoding. None: ~/.cache/vltrain/encoded. On several nodes
    it may be shared (every rank opens rank 0's entry) or local to each node (each node's first process encodes
    into its own folder, the others of that node open that entry)."""
    encode_cache_max_gb: float | None = 100.0
    """Size budget of `encode_cache` in GB: once a run has written its entry, least recently used entries are
    deleted whole until the folder fits; an entry a running job uses is never deleted. null: no budget. Tiles
    are stored uncompressed (about 4 MB per InternVL2-8B record of 7 tiles: 400 GB per 100k records); for data
    beyond the disk, `encode: lazy`."""
    packing: bool = False
    """Pack several records into one sequence of up to `max_length` tokens (no record split; attention, positions
    and labels kept per record through `position_ids`). Batches, `global_batch_size` and the step count then
    count packs, not records: fewer, fuller steps per epoch (keep the learning rate per step, or raise it with
    the records per step)."""
    media_cache: str | None = None
    """Folder where images fetched from URLs are kept (fetched once). None: ~/.cache/vltrain/media."""
    url_timeout: float = 20.0
    """Seconds per attempt when fetching an image URL."""
    url_retries: int = 2
    """Extra attempts after a failed fetch."""
    url_max_bytes: int = 50_000_000
    """Largest image a URL may return."""
    max_image_pixels: int = 89_478_485
    """Largest image (width x height), and largest video frame, read; a larger one is refused from its header,
    before any pixel is decoded (decompression bombs). The default is PIL's own warning threshold (~9,459 px
    square)."""
    max_video_frames: int = 1_000_000
    """Videos whose header (or, without one, whose count while decoding) exceeds this many frames are refused."""

    def __post_init__(self):
        if self.max_length < 16:
            raise ConfigError(f"data.max_length must be >= 16, got {self.max_length}")
        if self.video_frames < 1:
            raise ConfigError(f"data.video_frames must be >= 1, got {self.video_frames}")
        if self.num_proc < 1:
            raise ConfigError(f"data.num_proc must be >= 1, got {self.num_proc}")
        if self.encode_cache_max_gb is not None and not self.encode_cache_max_gb > 0:
            raise ConfigError(f"data.encode_cache_max_gb must be > 0 (or null: no budget), got "
                              f"{self.encode_cache_max_gb}")
        if self.max_image_pixels < 1:
            raise ConfigError(f"data.max_image_pixels must be >= 1, got {self.max_image_pixels}")
        if self.max_video_frames < 1:
            raise ConfigError(f"data.max_video_frames must be >= 1, got {self.max_video_frames}")


@dataclass
class SftConfig:
    name: Literal["lora", "full"] = "lora"
    """`lora`: adapters on the LLM and projector, everything else frozen. `full`: train all unfrozen parts."""
    lora_rank: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: str | list[str] = "default"
    """`default`: every linear layer of the LLM (not the LM head) and of the projector, never the vision tower.
    A list of module-name suffixes, or a regex string matched against full module names."""
    init_adapter: str | None = None
    """lora only: a LoRA checkpoint whose adapter starts the training (a vltrain checkpoint, or an ms-swift or
    official InternVL one, converted onto `model.path`); its rank, alpha and target modules are used instead of
    the lora_* keys. Only the adapter weights are read: the optimizer and schedule start afresh."""
    freeze_vision: bool = False
    """full only: keep the vision tower frozen."""
    freeze_llm: bool = False
    """full only: keep the language model (and LM head) frozen."""
    freeze_projector: bool = False
    """full only: keep the projector frozen."""
    lora_experts: bool = False
    """lora only, MoE LLMs: LoRA on the experts' fused weights too (peft `target_parameters` on every layer's
    `mlp.experts.gate_up_proj` and `mlp.experts.down_proj`, one rank-`lora_rank` pair per expert). Each forward
    then adds the low-rank update to the whole expert stack of a layer (memory and time of one more copy of
    those weights), and peft allows no dropout there: it needs `lora_dropout: 0`."""

    def __post_init__(self):
        if self.name == "lora" and (self.freeze_vision or self.freeze_llm or self.freeze_projector):
            raise ConfigError("sft_type.freeze_* flags apply to sft_type=full; LoRA already freezes the base model")
        if self.name == "full" and self.freeze_vision and self.freeze_llm and self.freeze_projector:
            raise ConfigError("sft_type=full with every part frozen leaves nothing to train")
        if self.lora_experts and self.name != "lora":
            raise ConfigError("sft_type.lora_experts applies to sft_type=lora (full fine-tuning trains the experts)")
        if self.lora_experts and self.lora_dropout:
            raise ConfigError(f"sft_type.lora_experts: peft's LoRA on expert weights has no dropout; set "
                              f"sft_type.lora_dropout=0 (now {self.lora_dropout})")
        if self.init_adapter and self.name != "lora":
            raise ConfigError("sft_type.init_adapter applies to sft_type=lora")
        if self.lora_rank < 1:
            raise ConfigError(f"sft_type.lora_rank must be >= 1, got {self.lora_rank}")


@dataclass
class ParallelConfig:
    name: Literal["single", "ddp", "zero2", "zero3", "zero2_offload", "zero3_offload", "device_map"] = "single"
    """How processes and devices are used (README "Scaling out"): `single` one process on one device; `ddp` one
    process per device, each holding the whole model; `zero2` / `zero3` DeepSpeed ZeRO stage 2 / 3 (`_offload`:
    optimizer states, and for ZeRO-3 parameters too, in host memory); `device_map` one process whose model is
    split layer-wise over the visible GPUs."""
    deepspeed: str | dict[str, Any] | None = None
    """The DeepSpeed config of the zero* modes: the mapping in conf/parallel/<mode>.yaml (`auto` values are filled
    by the Trainer), or a path to the user's own JSON file, which replaces it."""
    wait_minutes: float = 180.0
    """How long the other ranks wait for rank 0's one-off work (checkpoint conversion, the data check, hub
    downloads) before giving up; independent of the collective timeout of training (`trainer.ddp_timeout`)."""

    def __post_init__(self):
        uses_deepspeed = self.name.startswith("zero")
        if self.deepspeed is not None and not uses_deepspeed:
            why = "a device map cannot be combined with DeepSpeed; " if self.name == "device_map" else ""
            raise ConfigError(f"parallel.deepspeed is set but parallel={self.name} does not use DeepSpeed ({why}"
                              "pick parallel=zero2 or zero3 to use a DeepSpeed config)")
        if uses_deepspeed and self.deepspeed is None:
            raise ConfigError(f"parallel={self.name}: parallel.deepspeed is empty (a DeepSpeed config mapping or a "
                              "JSON file path)")
        if self.wait_minutes <= 0:
            raise ConfigError(f"parallel.wait_minutes must be > 0, got {self.wait_minutes}")


@dataclass
class LoggerConfig:
    name: Literal["none", "tensorboard", "wandb"] = "none"
    """Experiment tracker besides `logging.jsonl` and the loss-curve PNG, which are always written."""
    project: str = "vltrain"
    """wandb project."""


@dataclass
class EvalConfig:
    generate_samples: int = 64
    """Held-out records answered by greedy generation at each evaluation (exact match); 0 disables it."""
    max_new_tokens: int = 32
    """Token budget of those answers."""


@dataclass
class TrainConfig:
    model: ModelConfig
    dataset: DatasetConfig
    data: DataConfig = field(default_factory=DataConfig)
    sft_type: SftConfig = field(default_factory=SftConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: dict[str, Any] = field(default_factory=dict)
    """Passed to transformers.TrainingArguments; `null` values are filled by `training_defaults`."""
    global_batch_size: int = 16
    """Sequences per optimiser step; gradient accumulation is derived from it unless set in `trainer`."""
    run_dir: str = "outputs/run"
    """The run folder (Hydra sets it to `outputs/<model>/<timestamp>`); checkpoints go inside it."""
    resume: str | None = None
    """`auto`: continue the newest complete checkpoint of the run folder (`hydra.run.dir`), or start there at step
    0 when it has none; a path: continue that run folder (or that checkpoint) in its own folder. None: a new run."""
    resume_only_model: bool = False
    """With `resume`: load the weights only; the optimizer and the learning-rate schedule start afresh (the step
    count and the data position continue)."""
    resume_force: bool = False
    """With `resume`: continue although the record files or the held-out split changed since the checkpoint."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN or inf loss or gradient: `stop` the run naming the step and the batch's records, or `skip` that
    optimizer step (no update) and go on."""
    loss_reduction: Literal["token", "sample", "square"] = "token"
    """How the trained tokens of a batch weigh in the training loss (`vltrain.train.loss`). `token`: every trained
    token alike, the mean over all of them in the optimizer step. `square`: each sample's tokens weigh
    1/sqrt(its trained tokens) (the official InternVL3.5 SFT recipe, `loss_reduction square`); `sample`: 1/n,
    every sample alike. With `data.packing` a sample is one record of a pack. The evaluation loss stays `token`."""
    router_aux_loss_coef: float | None = None
    """MoE LLMs (Qwen3-MoE, GPT-OSS): weight of the router's load-balancing loss added to the training loss (logged
    as `router_aux_loss`). None: as the official recipe, the LLM config's `router_aux_loss_coef` when its
    `output_router_logits` is true, and always for GPT-OSS (whose recipe forces it); 0: never."""

    def __post_init__(self):
        unknown = set(self.trainer) - training_argument_names()
        if unknown:
            key = sorted(unknown)[0]
            raise ConfigError(f"trainer.{key}: not a TrainingArguments field{suggest(key, training_argument_names())}")
        if "output_dir" in self.trainer:
            raise ConfigError("trainer.output_dir: set run_dir instead (Hydra's hydra.run.dir)")
        if self.trainer.get("resume_from_checkpoint") is not None:
            raise ConfigError("trainer.resume_from_checkpoint: use resume=auto (the newest checkpoint of this run "
                              "folder) or resume=<run folder or checkpoint>")
        check_trainer_values(self.trainer)
        if (self.resume_only_model or self.resume_force) and not self.resume:
            raise ConfigError("resume_only_model / resume_force apply with resume=auto or resume=<path>")
        if self.resume_only_model and self.parallel.name.startswith("zero"):
            # the Trainer resumes DeepSpeed through the engine's own checkpoint, optimizer and schedule included
            raise ConfigError(f"resume_only_model: not available with DeepSpeed (parallel={self.parallel.name}), "
                              "whose checkpoints always restore the optimizer; resume without it, or start a new run "
                              "from the checkpoint's weights (model.path=<checkpoint>)")
        if self.router_aux_loss_coef is not None and not (math.isfinite(self.router_aux_loss_coef)
                                                         and self.router_aux_loss_coef >= 0):
            raise ConfigError(f"router_aux_loss_coef must be a number >= 0 (or null), got {self.router_aux_loss_coef}")
        if self.global_batch_size < 1:
            raise ConfigError(f"global_batch_size must be >= 1, got {self.global_batch_size}")
        if self.model.load_in_8bit and self.sft_type.name != "lora":
            raise ConfigError("model.load_in_8bit: 8-bit weights cannot be trained directly; use sft_type=lora")
        if self.model.load_in_8bit and self.parallel.name.startswith("zero"):
            # DeepSpeed partitions, casts and gathers float parameters; bitsandbytes' Int8Params are none of those
            raise ConfigError(f"model.load_in_8bit: 8-bit weights cannot be partitioned by DeepSpeed ZeRO (parallel="
                              f"{self.parallel.name}); use parallel=single, ddp or device_map with 8-bit, or a zero* "
                              "mode with model.load_in_8bit=false")
        device_map_keys = [k for k in ("device_max_memory", "device_map_config") if getattr(self.model, k)]
        if self.parallel.name.startswith("zero") or self.trainer.get("deepspeed"):
            if device_map_keys:
                raise ConfigError(f"model.{device_map_keys[0]}: a device map cannot be combined with DeepSpeed "
                                  f"(parallel={self.parallel.name}); use parallel=device_map without DeepSpeed, "
                                  "or a zero* mode without a device map")
        elif device_map_keys and self.parallel.name != "device_map":
            raise ConfigError(f"model.{device_map_keys[0]} applies to parallel=device_map (now parallel="
                              f"{self.parallel.name})")
        if self.trainer.get("deepspeed"):
            raise ConfigError("trainer.deepspeed: choose parallel=zero2 / zero3 (and parallel.deepspeed=<file.json> "
                              "for your own config) instead")


# key -> (lowest allowed, whether the lowest itself is allowed); null values are left to training_defaults.
_TRAINER_BOUNDS = {
    "learning_rate": (0, True), "weight_decay": (0, True), "warmup_steps": (0, True), "max_grad_norm": (0, True),
    "num_train_epochs": (0, False), "per_device_train_batch_size": (1, True), "per_device_eval_batch_size": (1, True),
    "gradient_accumulation_steps": (1, True), "logging_steps": (0, False), "eval_steps": (0, False),
    "save_steps": (0, False), "save_total_limit": (1, True), "dataloader_num_workers": (0, True),
    "adam_beta1": (0, True), "adam_beta2": (0, True), "adam_epsilon": (0, False),
}


def check_trainer_values(trainer: dict[str, Any]) -> None:
    """Numbers in the `trainer` block that the optimizer or the Trainer would refuse later, deep in a traceback."""
    for key, (low, inclusive) in _TRAINER_BOUNDS.items():
        value = trainer.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"trainer.{key}: expected a number, got {value!r}")
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            raise ConfigError(f"trainer.{key} must be {'>=' if inclusive else '>'} {low}, got {value}")
    for key in ("adam_beta1", "adam_beta2"):
        if trainer.get(key) is not None and trainer[key] >= 1:
            raise ConfigError(f"trainer.{key} must be below 1, got {trainer[key]}")
    if trainer.get("max_steps") == 0:
        raise ConfigError("trainer.max_steps=0 trains nothing; -1 trains num_train_epochs epochs")


def training_argument_names() -> set[str]:
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments) if f.init}


def training_defaults(cfg: TrainConfig, world_size: int = 1) -> dict[str, Any]:
    """The `trainer` block with every `null` resolved the way an ms-swift 2.x user expects."""
    t = dict(cfg.trainer)
    lora = cfg.sft_type.name == "lora"
    if t.get("learning_rate") is None:
        t["learning_rate"] = 1e-4 if lora else 1e-5
    if t.get("gradient_accumulation_steps") is None:
        per_step = t.get("per_device_train_batch_size") or 1
        t["gradient_accumulation_steps"] = max(1, math.ceil(cfg.global_batch_size / per_step / world_size))
    if t.get("eval_steps") is None:
        t["eval_steps"] = 50 if lora else 200
    if t.get("save_steps") is None:
        t["save_steps"] = t["eval_steps"]
    return {k: v for k, v in t.items() if v is not None}


# ---- validation: plain dict -> dataclasses --------------------------------------------------------------


def validate(data: dict[str, Any]) -> TrainConfig:
    """Build a TrainConfig from a resolved plain dict; raises ConfigError naming the offending key."""
    return build_dataclass(TrainConfig, data, "")


def suggest(key: str, choices) -> str:
    """` (did you mean 'x'?)` for the closest of `choices`, or "" when none is close.

    A choice that differs only in `-` / `_` / case wins: model types mix both (`internvl2-8b`, `internvl2_5-8b`),
    so plain string similarity would send `internvl2_8b` to the wrong generation."""
    choices = list(choices)
    spelled = {c.replace("_", "-").lower(): c for c in choices}
    same = spelled.get(key.replace("_", "-").lower())
    close = [same] if same is not None else difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def build_dataclass(cls, data: Any, prefix: str):
    """`cls` from a plain mapping, each value checked against its field's type; errors name `prefix` + key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(f"{prefix}{key}: unknown key{suggest(key, names)}; valid keys: {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key}: '{value}' is not one of {', '.join(map(str, choices))}"
                              f"{suggest(str(value), map(str, choices))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def schema_keys(cls=TrainConfig, prefix: str = "") -> set[str]:
    """Every dotted key the schema accepts (for checking command-line overrides before composing)."""
    keys = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        keys.add(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys |= schema_keys(hints[f.name], f"{prefix}{f.name}.")
    return keys


# ---- composing: command-line overrides -> a composed plain dict ---------------------------------------------------

GROUPS = ("model", "dataset", "sft_type", "parallel", "logger", "recipe")
CONF_DIR = Path(__file__).resolve().parent / "conf"


def _is_hydra_key(key: str) -> bool:
    return key in GROUPS or key.startswith(("hydra.", "hydra/"))


def check_overrides(argv: Iterable[str], extra_keys: Iterable[str] = ()) -> None:
    """Reject a misspelt command-line key or group option before Hydra composes, with the closest valid one.
    `extra_keys`: keys a command takes besides the TrainConfig schema (`vltrain check`'s `show`)."""
    known = schema_keys() | {f"trainer.{k}" for k in training_argument_names()} | set(extra_keys)
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key in GROUPS:
            check_group_option(key, value)
            continue
        if _is_hydra_key(key) or key in known or key.startswith("model.arch."):  # arch: a free-form dict
            continue
        raise ConfigError(f"{key}: unknown config key{suggest(key, known | set(GROUPS))}")


def group_options(group: str) -> list[str]:
    """The options of a config group: the YAML files in `vltrain/conf/<group>/`."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_group_option(group: str, value: str) -> None:
    """`model=internvl2_8b`: one line with the closest option, instead of Hydra's page-long message."""
    if group == "recipe" or "(" in value or value in ("null", ""):  # sweeps such as choice(...) left to Hydra
        return
    options = group_options(group)
    for option in value.split(","):  # a multirun sweep: lora,full
        if option not in options:
            raise ConfigError(f"{group}={option}: no such {group}{suggest(option, options)}; "
                              f"options: {', '.join(options)}")


def add_or_override(argv: Iterable[str]) -> list[str]:
    """`key=value` -> `++key=value` for schema keys, so that a key the YAML files leave to its dataclass default
    (`data.on_error`, `data.num_proc`, ...) can be set like any other (plain `key=` is only for keys in the YAML)."""
    out = []
    for arg in argv:
        key = arg.split("=", 1)[0]
        plain = "=" in arg and not arg.startswith(("-", "+", "~"))
        out.append(f"++{arg}" if plain and not _is_hydra_key(key) else arg)
    return out


def compose(overrides: Iterable[str] = (), config_name: str = "train", extra_keys: Iterable[str] = (),
            run_dir: str | None = None) -> dict[str, Any]:
    """`conf/<config_name>.yaml` with the overrides, as a plain dict, without starting a Hydra job. `run_dir` None
    keeps the composed one (Hydra's run folder is only known inside a job)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from omegaconf import OmegaConf

    overrides = list(overrides)
    check_overrides(overrides, extra_keys)
    with initialize_config_module("vltrain.conf", version_base="1.3"):
        head = [f"run_dir={run_dir or 'outputs/composed'}"]
        cfg = hydra_compose(config_name, overrides=[*head, *add_or_override(overrides)])
    return OmegaConf.to_container(cfg, resolve=True)


# ---- resolving: a composed dict (+ a resumed run's saved config) -> the TrainConfig --------------------------------


def resolve_config(composed: Any, given: Iterable[str] = (), extra_keys: Iterable[str] = (),
                   new_run: bool = True) -> tuple[TrainConfig, dict[str, Any]]:
    """THE final config of a command: (TrainConfig, the command's own keys `extra_keys`, apart).

    `composed`: what Hydra composed (a DictConfig or plain dict); `given`: the overrides the command line gave.
    A resumed run (`resume` set) starts from the config its checkpoint saved, takes only the keys on the command
    line, and refuses those that change what is trained (`resumed_config`). A new training run (`new_run`)
    refuses a run folder that holds another run (on the main process: the others may already see its files)."""
    from omegaconf import DictConfig, OmegaConf

    data = OmegaConf.to_container(composed, resolve=True) if isinstance(composed, DictConfig) else dict(composed)
    extras = {k: data.pop(k) for k in extra_keys if k in data}
    data.pop("recipe", None)
    if data.get("resume") in (None, "", "null"):
        cfg = validate(data)
        if new_run:
            from vltrain.context import process
            from vltrain.manifest import refuse_existing_run

            if process().is_main:
                refuse_existing_run(Path(cfg.run_dir))
        return cfg, extras
    from vltrain.manifest import find_resume_point

    point = find_resume_point(data["resume"], data["run_dir"])
    if point.saved is None:  # a run that never saved its config starts from the composed one
        return validate(data), extras
    # the saved config, with the keys given on the command line; what an earlier resume saved does not carry over
    merged = {**copy.deepcopy(point.saved), "run_dir": data["run_dir"], "resume": data["resume"],
              "resume_only_model": False, "resume_force": False}
    for arg in given:
        key = arg.split("=", 1)[0].lstrip("+~")
        if "=" not in arg or key.startswith("hydra") or key in ("recipe", "run_dir", *extra_keys):
            continue
        node_saved, node_new, parts = merged, data, key.split(".")
        for part in parts[:-1]:
            node_saved = node_saved.setdefault(part, {})
            node_new = node_new.get(part, {}) if isinstance(node_new, dict) else {}
        if isinstance(node_new, dict) and parts[-1] in node_new:
            node_saved[parts[-1]] = node_new[parts[-1]]
    return resumed_config(validate(merged), point), extras


def compose_config(overrides: Iterable[str] = (), run_dir: str = "outputs/composed") -> TrainConfig:
    """The TrainConfig `vltrain train <overrides>` trains, in folder `run_dir` (tests and the Python API)."""
    overrides = list(overrides)
    return resolve_config(compose(overrides, run_dir=run_dir), overrides)[0]


def compose_command(overrides: Iterable[str], config_name: str, options_class, run_dir: str):
    """(TrainConfig, options) of a command other than train: the config composed from `conf/<config_name>.yaml`
    and the overrides, and the command's own keys (the fields of the dataclass `options_class`) as an instance."""
    overrides = list(overrides)
    keys = tuple(f.name for f in dataclasses.fields(options_class))
    composed = compose(overrides, config_name=config_name, extra_keys=keys, run_dir=run_dir)
    cfg, extras = resolve_config(composed, overrides, extra_keys=keys, new_run=False)
    return cfg, build_dataclass(options_class, extras, "")


def run_config_yaml(cfg: TrainConfig) -> str:
    """The resolved config as a run saves it: data paths made absolute, so a checkpoint is usable from any folder."""
    import yaml

    from vltrain.data.specs import absolute_spec

    data = dataclasses.asdict(cfg)
    data["dataset"]["train"] = [absolute_spec(s) for s in cfg.dataset.train]
    data["dataset"]["val"] = [absolute_spec(s) for s in cfg.dataset.val]
    data["dataset"]["demo_root"] = None
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


# Keys a resume may change: how the run is logged, evaluated, saved and fed, not what it trains.
HARMLESS_KEYS = {
    "run_dir", "resume", "resume_only_model", "resume_force", "on_nonfinite", "logger", "eval", "data.num_proc",
    "data.encode_cache_max_gb", "data.media_cache", "data.url_timeout", "data.url_retries", "data.url_max_bytes",
    "trainer.logging_steps", "trainer.logging_first_step", "trainer.logging_strategy", "trainer.eval_steps",
    "trainer.eval_strategy", "trainer.eval_on_start", "trainer.save_steps", "trainer.save_strategy",
    "trainer.save_total_limit", "trainer.dataloader_num_workers", "trainer.dataloader_prefetch_factor",
    "trainer.dataloader_persistent_workers", "trainer.dataloader_pin_memory",
    "trainer.dataloader_multiprocessing_context", "trainer.per_device_eval_batch_size", "trainer.report_to", "trainer.max_steps", "trainer.disable_tqdm", "trainer.log_level",
}


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and (prefix == "" or prefix.rstrip(".") in ("model", "dataset", "data", "sft_type",
                                                                          "parallel", "logger", "eval", "trainer")):
        out = {}
        for k, v in data.items():
            out |= _flatten(v, f"{prefix}{k}.")
        return out
    return {prefix.rstrip("."): data}


def _harmless(key: str) -> bool:
    return any(key == h or key.startswith(h + ".") for h in HARMLESS_KEYS)


def resumed_config(cfg: TrainConfig, point) -> TrainConfig:
    """The saved config of `point` (a `manifest.ResumePoint`) with the harmless changes `cfg` makes (logging,
    evaluation, saving, workers, a longer `max_steps`); a ConfigError naming every key that would change what is
    trained."""
    import yaml

    if point.saved is None:
        return cfg
    current, saved = _flatten(yaml.safe_load(run_config_yaml(cfg))), _flatten(point.saved)
    # A random base is saved into the run folder: the checkpoint's config names that folder instead.
    if current.get("model.init") == "random" and saved.get("model.init") == "pretrained":
        for key in ("model.init", "model.path"):
            current[key] = saved.get(key)
    changed = sorted(k for k in current.keys() | saved.keys() if current.get(k) != saved.get(k))
    refused = [k for k in changed if not _harmless(k)]
    if refused:
        shown = ", ".join(f"{k} ({saved.get(k)!r} -> {current.get(k)!r})" for k in refused[:4])
        more = f" and {len(refused) - 4} more" if len(refused) > 4 else ""
        raise ConfigError(f"resume: the run was trained with other values of {shown}{more}; a resumed run keeps "
                          "what it trains (model, data, sft_type, batch geometry); start a new run instead")
    merged = dict(point.saved)
    for key in changed:
        _set(merged, key, current.get(key))
    merged["run_dir"] = str(point.run_dir)
    new = validate(merged)
    max_steps = new.trainer.get("max_steps")
    if max_steps is not None and 0 < max_steps < point.step:
        raise ConfigError(f"trainer.max_steps={max_steps}: the checkpoint is already at step {point.step}")
    return dataclasses.replace(new, resume=cfg.resume, resume_only_model=cfg.resume_only_model,
                               resume_force=cfg.resume_force)


def _set(data: dict, key: str, value: Any) -> None:
    head, _, rest = key.partition(".")
    if rest and isinstance(data.get(head), dict):
        data[head] = dict(data[head])
        _set(data[head], rest, value)
    elif value is None and head in data and not rest:
        data[head] = None
    else:
        data[head] = value
