"""Memory plan: parameters by part and the estimated GPU memory of a training run, offline, from `model.arch`.

`vltrain plan` prints `plan_text` (the same overrides as training, plus `world_size` and `tiles`):
    vltrain plan model=internvl2-8b sft_type=full parallel=zero2 world_size=8 \
        trainer.per_device_train_batch_size=2 data.max_length=4096
    vltrain plan model=internvl2-26b parallel=device_map     # and a suggested model.device_max_memory

No weights and no tokenizer are read: the model is built on the `meta` device from `model.arch` (LoRA adapters
included), so any type plans in a second. The formula (README "Memory plan") per GPU, with P parameters, T of them
trainable, N processes, b bytes per compute-dtype value (2 for bf16):

    weights     single/ddp: full 4P (fp32 master weights), LoRA b(P-T) + 4T;  zero2: bP;  zero3: bP/N;
                zero3_offload: 0;  device_map: the single-process value / devices
    gradients   single/ddp: 4T;  zero2/zero3: bT/N;  device_map: 4T / devices
    optimizer   Adam: single/ddp 8T (two fp32 moments);  zero*: 12T/N (fp32 master copy + moments);  *_offload: 0
    buffers     zero2: b(2 x reduce_bucket_size + allgather_bucket_size);  zero3: 2 x the largest layer, gathered
    activations per sample of `data.max_length` = L tokens and `tiles` tiles of 448 px:
                LLM, checkpointing on: layers x L x h x b (each layer's input) + one layer recomputed, L(8h + 4i)b
                (i: the MLP width a token runs through; mixture of experts: one expert's width x experts per token);
                checkpointing off: layers x L(8h + 4i)b;  logits: L x V x 10 bytes (bf16, fp32 copy, fp32 grad);
                vision (only when the vision tower trains): the same per tile with its 1025 tokens, 8h + 2i;
                times the per-device batch
    overhead    1 GiB (CUDA context and allocator)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from vltrain.config import TrainConfig
from vltrain.context import process

GiB = 2**30
OVERHEAD = 1 * GiB


@dataclass
class PlanOptions:
    world_size: int | None = None
    """Processes (GPUs) the run uses. None: WORLD_SIZE of the launch, else 1 (device_map: the devices)."""
    tiles: int | None = None
    """448 px tiles per sample. None: model.max_tiles + 1 (the thumbnail)."""
    devices: int | None = None
    """parallel=device_map: GPUs to spread the model over. None: len(model.device_max_memory), else 1 per 80 GB."""
    gpu_gb: float = 80.0
    """Memory of one GPU, for the suggested device map."""


@dataclass
class Counts:
    """Parameters by part (total and trainable) and the shapes the activation estimate needs."""

    total: dict[str, int] = field(default_factory=dict)
    trainable: dict[str, int] = field(default_factory=dict)
    llm_layers: int = 0
    hidden: int = 0
    intermediate: int = 0
    vocab: int = 0
    vision_layers: int = 0
    vision_hidden: int = 0
    vision_intermediate: int = 0
    vision_tokens: int = 0
    largest_layer: int = 0


def count_parameters(cfg: TrainConfig) -> Counts:
    """Build the model of `cfg` on `meta` (with LoRA when sft_type=lora) and count its parameters by part."""
    import dataclasses

    import torch

    from vltrain.model.load import load_model
    from vltrain.model.tuning import apply_sft, part_of

    model_cfg = dataclasses.replace(cfg.model, init="random")
    tokenizer = None
    if not model_cfg.arch.get("llm", {}).get("vocab_size"):  # the tiny type: vocabulary from its embedded tokenizer
        from vltrain.model.vocab import load_tokenizer_for

        tokenizer = load_tokenizer_for(dataclasses.replace(model_cfg, path=None, tokenizer=None))
    model = load_model(model_cfg, tokenizer, meta=True)
    base_names = {id(p): n for n, p in model.named_parameters()}
    counts = Counts()
    for name, p in model.named_parameters():
        part = part_of(name)
        counts.total[part] = counts.total.get(part, 0) + p.numel()
    with torch.device("meta"):
        tuned = apply_sft(model, cfg.sft_type)
    from vltrain.model.tuning import trainable_parts

    counts.trainable = trainable_parts(tuned)
    for name, p in tuned.named_parameters():
        if id(p) not in base_names and "lora_" in name:  # adapters: counted in total too
            part = part_of(name.removeprefix("base_model.model.").split(".lora_")[0])
            counts.total[part] = counts.total.get(part, 0) + p.numel()
    text = model.config.text_config
    vision = model.config.vision_config
    counts.llm_layers, counts.hidden = text.num_hidden_layers, text.hidden_size
    counts.intermediate, counts.vocab = active_intermediate(text), text.vocab_size
    counts.vision_layers, counts.vision_hidden = vision.num_hidden_layers, vision.hidden_size
    counts.vision_intermediate = vision.intermediate_size
    size = vision.image_size[0] if isinstance(vision.image_size, (list, tuple)) else vision.image_size
    patch = vision.patch_size[0] if isinstance(vision.patch_size, (list, tuple)) else vision.patch_size
    counts.vision_tokens = (size // patch) ** 2 + 1
    counts.largest_layer = max(
        sum(p.numel() for p in model.model.language_model.layers[0].parameters()),
        sum(p.numel() for p in model.model.vision_tower.encoder.layer[0].parameters()),
        model.model.language_model.embed_tokens.weight.numel())
    return counts


def active_intermediate(text) -> int:
    """The MLP width one token runs through: `intermediate_size` for a dense LLM; for a mixture of experts, the
    width of one expert times the experts each token is routed to (Qwen3-MoE: `moe_intermediate_size` x
    `num_experts_per_tok`; GPT-OSS: `intermediate_size` x `num_experts_per_tok`)."""
    routed = getattr(text, "num_experts_per_tok", None)
    if not routed:
        return text.intermediate_size
    return (getattr(text, "moe_intermediate_size", None) or text.intermediate_size) * routed


@dataclass
class Estimate:
    """Bytes per GPU by kind."""

    weights: float
    gradients: float
    optimizer: float
    buffers: float
    activations: float
    overhead: float = OVERHEAD

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.buffers + self.activations + self.overhead


def estimate(cfg: TrainConfig, counts: Counts, world_size: int, tiles: int, devices: int = 1,
             dtype_bytes: int = 2) -> Estimate:
    """The formula of the module docstring, in bytes per GPU."""
    mode = cfg.parallel.name
    b = dtype_bytes
    P = sum(counts.total.values())
    T = sum(counts.trainable.values())
    full = cfg.sft_type.name == "full"
    n = world_size
    if mode.startswith("zero"):
        weights = 0.0 if mode == "zero3_offload" else (b * P / n if mode.startswith("zero3") else b * P)
        gradients = b * T / n
        optimizer = 0.0 if mode.endswith("offload") else 12 * T / n
        zero = (cfg.parallel.deepspeed or {}) if isinstance(cfg.parallel.deepspeed, dict) else {}
        z = zero.get("zero_optimization", {})
        if mode.startswith("zero2"):
            reduce = _number(z.get("reduce_bucket_size"), 5e8)
            gather = _number(z.get("allgather_bucket_size"), 5e8)
            buffers = b * (2 * reduce + gather)
        else:
            buffers = 2 * b * counts.largest_layer
    else:
        weights = 4 * P if full else b * (P - T) + 4 * T
        gradients = 4 * T
        optimizer = 8 * T
        buffers = 0.0
        if mode == "device_map":
            weights, gradients, optimizer = weights / devices, gradients / devices, optimizer / devices
    batch = int(cfg.trainer.get("per_device_train_batch_size") or 1)
    checkpointing = bool(cfg.trainer.get("activation_checkpointing", cfg.trainer.get("gradient_checkpointing")))
    L, h, i = cfg.data.max_length, counts.hidden, counts.intermediate
    layer = L * (8 * h + 4 * i) * b
    llm = counts.llm_layers * L * h * b + layer if checkpointing else counts.llm_layers * layer
    logits = L * counts.vocab * 10
    vision = 0.0
    if counts.trainable.get("vision", 0):
        tokens = tiles * counts.vision_tokens
        vlayer = tokens * (8 * counts.vision_hidden + 2 * counts.vision_intermediate) * b
        vision = (counts.vision_layers * tokens * counts.vision_hidden * b + vlayer if checkpointing
                  else counts.vision_layers * vlayer)
    activations = batch * (llm + logits + vision)
    if mode == "device_map":  # layer-wise: each GPU holds about its share of the layers' activations
        activations /= devices
    return Estimate(weights, gradients, optimizer, buffers, activations)


def _number(value, default: float) -> float:
    return float(value) if isinstance(value, (int, float)) else default


def suggest_device_max_memory(cfg: TrainConfig, counts: Counts, tiles: int, devices: int) -> list[str]:
    """Per-GPU budgets for `model.device_max_memory`: the estimate spread evenly over `devices` (weights,
    gradients, optimizer states and activations of a device's layers, plus the overhead), rounded up."""
    est = estimate(cfg, counts, 1, tiles, devices=devices)
    return [f"{math.ceil(est.total / GiB)}GB" for _ in range(devices)]


def plan_text(cfg: TrainConfig, options: PlanOptions) -> str:
    counts = count_parameters(cfg)
    world = options.world_size or process().world_size
    tiles = options.tiles or cfg.model.max_tiles + 1
    mode = cfg.parallel.name
    devices = options.devices or (len(cfg.model.device_max_memory) if cfg.model.device_max_memory else 0)
    lines = [f"model {cfg.model.name}: sft_type={cfg.sft_type.name}, parallel={mode}, "
             + (f"devices {devices or 'auto'}" if mode == "device_map" else f"world_size {world}")
             + f", per-device batch {cfg.trainer.get('per_device_train_batch_size') or 1}, data.max_length "
             f"{cfg.data.max_length}, {tiles} tiles per sample", "",
             f"{'part':<10} {'parameters':>16} {'trainable':>16}"]
    for part in ("vision", "projector", "llm"):
        lines.append(f"{part:<10} {counts.total.get(part, 0):>16,} {counts.trainable.get(part, 0):>16,}")
    lines.append(f"{'total':<10} {sum(counts.total.values()):>16,} {sum(counts.trainable.values()):>16,}")
    if mode == "device_map":
        if not devices:
            single = estimate(cfg, counts, 1, tiles, devices=1)
            devices = max(1, math.ceil(single.total / (options.gpu_gb * 1e9 * 0.9)))
        world = 1
    est = estimate(cfg, counts, world, tiles, devices=max(devices, 1))
    lines += ["", "estimated memory per GPU (GiB; bf16 compute)"]
    for name in ("weights", "gradients", "optimizer", "buffers", "activations", "overhead"):
        lines.append(f"  {name:<12} {getattr(est, name) / GiB:>8.2f}")
    lines.append(f"  {'total':<12} {est.total / GiB:>8.2f}")
    if mode == "device_map":
        budgets = ",".join(suggest_device_max_memory(cfg, counts, tiles, devices))
        lines.append(f"suggested model.device_max_memory=[{budgets}]")
    return "\n".join(lines)
