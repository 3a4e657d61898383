"""Dtype and device placement of a model: the compute dtype, what can be known wrong before anything big loads
(attention implementation, 8-bit support), and the 8-bit LLM (bitsandbytes) for `model.load_in_8bit`.

The layer-wise device map of `parallel=device_map` is planned in vltrain.train.parallel and applied while the
model is built or loaded (vltrain.model.load).
"""

from __future__ import annotations

import logging

import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration
from transformers.utils import is_bitsandbytes_available, is_flash_attn_2_available

from vltrain.config import ConfigError, ModelConfig, SftConfig
from vltrain.context import process

log = logging.getLogger(__name__)

ATTN_IMPLS = ("sdpa", "eager", "flash_attention_2")

# 8-bit weights go to the LLM's linear layers only. The vision tower and projector are small next to the LLM
# (0.3B of InternVL2-8B; 6B of 26B-76B but run once per tile, not per token) and their outputs feed every image
# token, so int8 rounding there costs accuracy for little memory; the LM head stays exact for the logits
# (transformers' and bitsandbytes' own rule). LoRA adapters train on top of the frozen 8-bit LLM.
INT8_SKIP_MODULES = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
INT8_THRESHOLD = 6.0  # LLM.int8() outlier threshold (transformers' BitsAndBytesConfig default)


def native_bf16() -> bool:
    """Whether this process's GPU computes bf16 natively: NVIDIA compute capability 8.0 (Ampere) and later, or a
    ROCm GPU. torch's plain `is_bf16_supported()` also answers yes on a V100 or T4 (7.x), where bf16 runs emulated
    through fp32 at a fraction of fp16's speed; those get fp16."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_dtype(name: str) -> torch.dtype:
    """The compute dtype of `model.dtype`, for training and inference alike. `auto`: bf16 on a GPU that computes it
    natively (`native_bf16`), fp16 on another GPU, fp32 on CPU (CPU bf16 is slow and lossy)."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.float32
        return torch.bfloat16 if native_bf16() else torch.float16
    if name == "bf16" and torch.cuda.is_available() and not native_bf16():
        major, minor = torch.cuda.get_device_capability()
        log.warning("model.dtype=bf16 on a GPU of compute capability %d.%d, which emulates bf16 (slowly); "
                    "model.dtype=auto picks fp16 there", major, minor)
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def check_model_config(cfg: ModelConfig) -> None:
    """What can be known wrong before anything big loads: the attention implementation and 8-bit support (asked of
    transformers' own availability checks, which also know the minimum versions)."""
    if cfg.attn_impl not in ATTN_IMPLS:
        raise ConfigError(f"model.attn_impl: '{cfg.attn_impl}' is not one of {', '.join(ATTN_IMPLS)}")
    if cfg.attn_impl == "flash_attention_2" and not is_flash_attn_2_available():
        raise ConfigError("model.attn_impl=flash_attention_2: transformers finds no usable flash-attn 2 here; it "
                          "needs a CUDA GPU" + ("" if torch.cuda.is_available() else " (none is visible)") +
                          " and the flash_attn package >= 2.3.3 (`pip install flash-attn --no-build-isolation`); "
                          "use model.attn_impl=sdpa (the default) or eager")
    if cfg.load_in_8bit:
        int8_device()


def int8_config():
    """transformers' BitsAndBytesConfig for the 8-bit LLM (at `from_pretrained` and for models built in memory)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=INT8_THRESHOLD,
                              llm_int8_skip_modules=INT8_SKIP_MODULES)


def int8_device() -> torch.device:
    """The device 8-bit weights live on: the local CUDA GPU, else the CPU when this bitsandbytes supports it
    (0.45+ does). One ConfigError saying why otherwise."""
    if not is_bitsandbytes_available():
        raise ConfigError("model.load_in_8bit: bitsandbytes is not installed (`pip install bitsandbytes`), or is "
                          "older than transformers supports; or set model.load_in_8bit=false")
    if torch.cuda.is_available():
        return torch.device("cuda", process().local_rank)
    import bitsandbytes as bnb

    supported = sorted(getattr(bnb, "supported_torch_devices", ()))
    if "cpu" not in supported:  # bitsandbytes before the multi-backend releases is CUDA-only
        raise ConfigError(f"model.load_in_8bit: this bitsandbytes ({getattr(bnb, '__version__', '?')}) cannot run "
                          f"8-bit layers without a CUDA GPU (it supports: {', '.join(supported) or 'CUDA only'}); "
                          "use a GPU machine, a newer bitsandbytes, or model.load_in_8bit=false")
    return torch.device("cpu")


def quantize_llm_8bit(model: torch.nn.Module, device: torch.device,
                      device_map: dict | None = None) -> torch.nn.Module:
    """What `from_pretrained(quantization_config=int8_config())` gives, for models built in memory (random init, the
    original-layout converter): transformers' `replace_with_bnb_linear` swaps the LLM's nn.Linear layers (not
    `INT8_SKIP_MODULES`) for empty 8-bit layers, which take the float weights and quantize on the move to
    `device` (with a `device_map`: each to its planned device, the rest left for `dispatch_model`); without a
    map the rest of the model moves to `device` too. In place."""
    import bitsandbytes as bnb
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    floats = {name: module for name, module in model.named_modules() if type(module) is torch.nn.Linear}
    replace_with_bnb_linear(model, modules_to_not_convert=INT8_SKIP_MODULES, quantization_config=int8_config())
    for name, layer in model.named_modules():
        if isinstance(layer, bnb.nn.Linear8bitLt):
            linear = floats[name]
            layer.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
            if linear.bias is not None:
                layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
            layer.to(_int8_device_of(name, device_map, device))  # quantizes
    if not device_map:
        model.to(device)
    model.is_loaded_in_8bit = True  # what peft / Trainer look at on from_pretrained-quantized models
    return model


# ---- device maps ---------------------------------------------------------------------------------------------


def model_class_of(config: InternVLConfig) -> type[InternVLForConditionalGeneration]:
    from vltrain.model.internvl import model_class

    try:
        return model_class(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def planning_model(config: InternVLConfig, dtype: torch.dtype, load_in_8bit: bool = False,
                   sft: SftConfig | None = None) -> InternVLForConditionalGeneration:
    """The model of `config` on `meta` as it will sit in memory, for sizing a device map: float weights in `dtype`
    (the loaded dtype: 2 bytes each in bf16, not the 4 of a default build), the LLM's linear weights at 1 byte
    under 8-bit (`INT8_SKIP_MODULES` stay in `dtype`; bitsandbytes' per-row scales, under 1%, are left out), and
    with `sft` LoRA the adapters training adds after loading (fp32, inside the layers they adapt). Returns the
    base model (adapters injected in place), so module names are the loaded model's."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = model_class_of(config)(config)
    model.to(dtype)
    if load_in_8bit:
        for name, module in model.named_modules():
            if type(module) is torch.nn.Linear and not any(name == p or name.startswith(p + ".")
                                                           for p in INT8_SKIP_MODULES):
                module.weight = torch.nn.Parameter(module.weight.to(torch.int8), requires_grad=False)
    if sft is not None and sft.name == "lora":
        from vltrain.model.tuning import apply_sft

        with torch.device("meta"):
            apply_sft(model, sft)  # injects the adapters into `model` itself
    return model


def resolve_device_map(device_map, config: InternVLConfig, dtype: torch.dtype, cfg: ModelConfig,
                        sft: SftConfig | None = None):
    if not callable(device_map):
        return device_map
    return device_map(planning_model(config, dtype, cfg.load_in_8bit, sft))


def _int8_device_of(name: str, device_map: dict | None, default: torch.device) -> torch.device:
    """Where the layer `name` goes under `device_map` (its longest matching entry), else `default`."""
    if not device_map:
        return default
    match = max((k for k in device_map if k == "" or name == k or name.startswith(k + ".")), key=len, default=None)
    if match is None:
        return default
    device = device_map[match]
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
