"""Device maps are planned on the model as it will sit in memory: weights in the loaded dtype (bf16 at 2 bytes),
8-bit LLM layers at 1 byte, LoRA adapters (fp32) inside the layers they adapt; 8-bit loading keeps the planned map."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch
from accelerate.utils import compute_module_sizes

from vltrain.config import ConfigError, SftConfig, compose_config
from vltrain.model.load import load_model
from vltrain.model.placement import INT8_SKIP_MODULES, planning_model
from vltrain.model.vocab import load_tokenizer_for
from vltrain.train.parallel import parse_size, placement_units, plan_device_map

needs_bitsandbytes = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                        reason="bitsandbytes not installed (8-bit loading is refused clearly instead)")


def _config(tmp_path, *overrides):
    return compose_config([*overrides, "dataset=custom", f"dataset.train=[{tmp_path / 'x.jsonl'}]"])


@pytest.fixture(scope="module")
def internvl2_1b(tmp_path_factory):
    """InternVL2-1B's config (Qwen2 0.5B LLM, InternViT-300M), from the model file alone."""
    cfg = _config(tmp_path_factory.mktemp("cfg"), "model=internvl2-1b", "model.init=random")
    return cfg, load_model(cfg.model, None, meta=True).config


def _lora_bytes(in_features: int, out_features: int, rank: int) -> int:
    return rank * (in_features + out_features) * 4  # lora_A (r x in) and lora_B (out x r), fp32


def test_weights_are_counted_in_the_loaded_dtype(internvl2_1b):
    _, config = internvl2_1b
    fp32 = compute_module_sizes(planning_model(config, torch.float32))
    bf16 = compute_module_sizes(planning_model(config, torch.bfloat16))
    model = planning_model(config, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for unit in placement_units(model):
        for name in unit:
            module = model.get_submodule(name)
            params = sum(p.numel() for p in module.parameters())
            buffers = sum(b.numel() for b in module.buffers())  # rotary inv_freq, cast like the weights
            assert bf16[name] == 2 * (params + buffers) and fp32[name] == 4 * (params + buffers), name
    assert bf16[""] < 0.51 * fp32[""]  # 0.94B parameters: 1.75 GiB, not 3.5


def test_lora_adapters_are_counted_in_the_layers_they_adapt(internvl2_1b):
    cfg, config = internvl2_1b
    text = config.text_config
    h, i, kv = text.hidden_size, text.intermediate_size, text.num_key_value_heads * (text.hidden_size //
                                                                                   text.num_attention_heads)
    r = cfg.sft_type.lora_rank
    per_layer = (_lora_bytes(h, h, r) * 2 + _lora_bytes(h, kv, r) * 2  # q, o; k, v
                 + _lora_bytes(h, i, r) * 2 + _lora_bytes(i, h, r))   # gate, up; down
    plain = compute_module_sizes(planning_model(config, torch.bfloat16))
    lora = compute_module_sizes(planning_model(config, torch.bfloat16, sft=cfg.sft_type))
    for layer in range(text.num_hidden_layers):
        name = f"model.language_model.layers.{layer}"
        assert lora[name] - plain[name] == per_layer, name
    assert lora["model.vision_tower"] == plain["model.vision_tower"]  # never adapted by default
    assert lora["lm_head"] == plain["lm_head"]
    full = compute_module_sizes(planning_model(config, torch.bfloat16, sft=SftConfig(name="full")))
    assert full == plain


def test_8bit_llm_layers_are_counted_at_one_byte(internvl2_1b):
    _, config = internvl2_1b
    model = planning_model(config, torch.bfloat16, load_in_8bit=True)
    sizes = compute_module_sizes(model)
    bf16 = compute_module_sizes(planning_model(config, torch.bfloat16))
    layer = model.model.language_model.layers[0]
    linear = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
    others = sum(p.numel() for n, p in layer.named_parameters() if not n.endswith("proj.weight"))
    assert sizes["model.language_model.layers.0"] == linear + 2 * others  # biases and norms stay bf16
    for kept in INT8_SKIP_MODULES:  # the vision tower, projector and LM head stay in the loaded dtype
        assert sizes[kept] == bf16[kept]


def test_a_bf16_model_is_planned_at_its_bf16_size(internvl2_1b):
    """1.75 GiB of bf16 weights fit 2 x 1.2 GB; counted at fp32's 4 bytes (3.5 GiB) they would not."""
    _, config = internvl2_1b
    budget = {0: parse_size("1.2GB"), 1: parse_size("1.2GB")}
    device_map = plan_device_map(planning_model(config, torch.bfloat16), budget)
    assert set(device_map.values()) == {0, 1}
    with pytest.raises(ConfigError, match="does not fit"):
        plan_device_map(planning_model(config, torch.float32), budget)


def test_load_model_plans_on_the_model_it_will_load(tmp_path):
    """The planner `load_model` calls sees the loaded dtype and the LoRA adapters, for random and saved models."""
    cfg = _config(tmp_path)
    tokenizer = load_tokenizer_for(cfg.model)
    seen = []

    def plan(model_on_meta):
        seen.append(({p.dtype for n, p in model_on_meta.named_parameters() if "lora_" not in n},
                     {p.dtype for n, p in model_on_meta.named_parameters() if "lora_" in n},
                     next(model_on_meta.parameters()).device.type))
        return {"": "cpu"}

    random_model = load_model(cfg.model, tokenizer, torch.bfloat16, device_map=plan, sft=cfg.sft_type)
    assert seen == [({torch.bfloat16}, {torch.float32}, "meta")]
    random_model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    saved = dataclasses.replace(cfg.model, init="pretrained", path=str(tmp_path / "base"))
    load_model(saved, tokenizer, torch.float32, device_map=plan)  # full fine-tuning: fp32, no adapters
    assert seen[1] == ({torch.float32}, set(), "meta")


def _per_unit_plan(model_on_meta) -> dict[str, str]:
    return {name: "cpu" for unit in placement_units(model_on_meta) for name in unit}


def test_8bit_layers_go_where_the_plan_puts_them():
    from vltrain.model.placement import _int8_device_of

    plan = {"model.vision_tower": 0, "model.language_model.layers.0": 0, "model.language_model.layers.1": 1,
            "lm_head": "cpu"}
    cpu = torch.device("cpu")
    assert _int8_device_of("model.language_model.layers.1.mlp.up_proj", plan, cpu) == torch.device("cuda", 1)
    assert _int8_device_of("model.language_model.layers.0.self_attn.q_proj", plan, cpu) == torch.device("cuda", 0)
    assert _int8_device_of("model.language_model.layers.10.self_attn.q_proj", plan, cpu) == cpu  # not in the map
    assert _int8_device_of("model.language_model.layers.1.mlp.up_proj", None, cpu) == cpu
    assert _int8_device_of("x.y", {"": 2}, cpu) == torch.device("cuda", 2)


@needs_bitsandbytes
def test_8bit_loading_keeps_the_planned_map(tmp_path, monkeypatch):
    """Random init dispatches with the plan; a saved folder hands the plan to `from_pretrained` (before: a map
    putting the whole model on one 8-bit device). On CPU every unit is planned onto the CPU, per unit."""
    from transformers import InternVLForConditionalGeneration

    cfg = _config(tmp_path)
    tokenizer = load_tokenizer_for(cfg.model)
    base = load_model(cfg.model, tokenizer, torch.float32)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    planned, given = [], []

    def plan(model_on_meta):
        assert model_on_meta.model.language_model.layers[0].mlp.down_proj.weight.dtype == torch.int8
        planned.append({name: "cpu" for unit in placement_units(model_on_meta) for name in unit})
        return planned[-1]

    original = InternVLForConditionalGeneration.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        given.append(kwargs.get("device_map"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(InternVLForConditionalGeneration, "from_pretrained", classmethod(from_pretrained))
    int8 = dataclasses.replace(cfg.model, load_in_8bit=True)
    random_model = load_model(int8, tokenizer, torch.float32, device_map=plan)
    assert random_model.hf_device_map == planned[0]
    saved = load_model(dataclasses.replace(int8, init="pretrained", path=str(Path(tmp_path / "base"))), tokenizer,
                       torch.float32, device_map=plan)
    assert given == [planned[1]]
    for model in (random_model, saved):
        assert model.model.language_model.layers[0].mlp.down_proj.weight.dtype == torch.int8
        assert model.lm_head.weight.dtype == torch.float32
