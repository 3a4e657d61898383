"""`python -m vltrain.plan`: parameter counts by part and memory per GPU, checked by hand for two real types
(InternVL2-1B: InternViT-300M + Qwen2-0.5B; InternVL2-8B: InternViT-300M + InternLM2.5-7B) and against the
official fine-tuning recipe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vltrain.cli.plan import compose_plan
from vltrain.train.memory import OVERHEAD, GiB, count_parameters, estimate

REPO = Path(__file__).resolve().parent.parent


def vit_300m() -> int:
    h, i, layers, tokens = 1024, 4096, 24, (448 // 14) ** 2 + 1
    embeddings = h + tokens * h + 3 * 14 * 14 * h + h  # class token, positions, patch conv (+ bias)
    layer = 2 * h + 4 * (h * h + h) + (h * i + i) + (i * h + h) + 2 * 2 * h  # scales, q k v o, mlp, 2 layer norms
    return embeddings + layers * layer


def projector(vision_h: int, llm_h: int) -> int:
    wide = vision_h * 4  # pixel shuffle 0.5: 4 tokens into one
    return 2 * wide + (wide * llm_h + llm_h) + (llm_h * llm_h + llm_h)


def llm(h: int, i: int, layers: int, heads: int, kv_heads: int, vocab: int, qkv_bias: bool) -> int:
    kv = h // heads * kv_heads
    attention = h * h + 2 * h * kv + h * h + ((h + 2 * kv) if qkv_bias else 0)
    layer = attention + 3 * h * i + 2 * h
    return vocab * h + layers * layer + h + vocab * h  # embeddings, layers, final norm, LM head


EXPECTED = {
    "internvl2-1b": (vit_300m(), projector(1024, 896), llm(896, 4864, 24, 14, 2, 151655, True), 0.94e9),
    "internvl2-8b": (vit_300m(), projector(1024, 4096), llm(4096, 14336, 32, 32, 8, 92553, False), 8.08e9),
}


@pytest.fixture(scope="module")
def counted():
    out = {}
    for name in EXPECTED:
        cfg, _ = compose_plan([f"model={name}", "sft_type=full"])
        out[name] = count_parameters(cfg)
    return out


@pytest.mark.parametrize("name", list(EXPECTED))
def test_parameters_by_part_match_the_hand_count(counted, name):
    vision, proj, language, published = EXPECTED[name]
    counts = counted[name]
    assert counts.total == {"vision": vision, "projector": proj, "llm": language}
    assert counts.trainable == counts.total  # sft_type=full, nothing frozen
    assert sum(counts.total.values()) == pytest.approx(published, rel=0.01)


def test_lora_counts_adapters_of_the_llm_and_projector():
    cfg, _ = compose_plan(["model=internvl2-1b", "sft_type=lora"])
    counts = count_parameters(cfg)
    r, h, i, kv = 8, 896, 4864, 896 // 14 * 2
    per_layer = r * ((h + h) + (h + kv) * 2 + (h + h) + 2 * (h + i) + (i + h))  # q k v o gate up down
    wide = 4096
    assert counts.trainable == {"llm": 24 * per_layer, "projector": r * ((wide + h) + (h + h))}
    assert counts.total["vision"] == vit_300m()


def test_memory_formula_by_hand_8b_full_zero2(counted):
    """InternVL2-8B full fine-tuning, ZeRO-2, 8 GPUs, batch 2 per GPU, 4096 tokens, 7 tiles, checkpointing."""
    cfg, _ = compose_plan(["model=internvl2-8b", "sft_type=full", "parallel=zero2",
                           "trainer.per_device_train_batch_size=2", "data.max_length=4096"])
    counts = counted["internvl2-8b"]
    P = sum(EXPECTED["internvl2-8b"][:3])
    est = estimate(cfg, counts, world_size=8, tiles=7)
    assert est.weights == 2 * P
    assert est.gradients == 2 * P / 8
    assert est.optimizer == 12 * P / 8
    assert est.buffers == 2 * (2 * 5e8 + 5e8)
    L, h, i, V = 4096, 4096, 14336, 92553
    llm_acts = 32 * L * h * 2 + L * (8 * h + 4 * i) * 2 + L * V * 10
    tokens = 7 * 1025
    vision_acts = 24 * tokens * 1024 * 2 + tokens * (8 * 1024 + 2 * 4096) * 2
    assert est.activations == 2 * (llm_acts + vision_acts)
    assert est.overhead == OVERHEAD
    # The official recipe's ~77 GB per 80 GB GPU for this run is allocator-reserved memory (and ZeRO-1, whose
    # unpartitioned bf16 gradients add 2P(1 - 1/8) = 14 GB): the estimate is below it, and the run fits.
    assert 0.5 * 77e9 < est.total < 77e9


def test_official_lora_and_zero3_runs_fit(counted):
    """LoRA of InternVL2-8B on 2 x 80 GB (batch 4 per GPU), and 8B full under ZeRO-3 on 8 GPUs: under 80 GB."""
    cfg, _ = compose_plan(["model=internvl2-8b", "sft_type=lora", "parallel=zero2",
                           "trainer.per_device_train_batch_size=4", "data.max_length=4096"])
    lora = estimate(cfg, count_parameters(cfg), world_size=2, tiles=7)
    assert lora.total < 80e9 and lora.optimizer < 1 * GiB
    full = {}
    for mode in ("zero2", "zero3"):
        cfg_full, _ = compose_plan(["model=internvl2-8b", "sft_type=full", f"parallel={mode}",
                                    "trainer.per_device_train_batch_size=2", "data.max_length=4096"])
        full[mode] = estimate(cfg_full, counted["internvl2-8b"], world_size=8, tiles=7)
    assert full["zero3"].weights == pytest.approx(full["zero2"].weights / 8)
    assert full["zero3"].total < full["zero2"].total


def test_plan_command_prints_parts_and_device_map_suggestion():
    out = subprocess.run([sys.executable, "-m", "vltrain.plan", "model=internvl2-1b", "sft_type=full",
                          "parallel=device_map", "model.device_max_memory=[15GB,15GB]"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "vision" in out.stdout and "304,012,288" in out.stdout
    assert "suggested model.device_max_memory=[" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "vltrain.plan", "world_sise=2"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "world_size" in bad.stderr



@pytest.mark.parametrize("name, active", [("internvl3_5-30b-a3b", 768 * 8), ("internvl3_5-gpt-oss-20b-a4b", 2880 * 4),
                                          ("internvl3_5-8b", 12288)])
def test_mixture_of_experts_counts_every_expert_and_activates_the_routed_ones(name, active):
    """Weights, gradients and optimizer states hold every expert; a token's activations go through the experts it is
    routed to: one expert's width x experts per token (GPT-OSS: 2880 x 4, four times its `intermediate_size`)."""
    import dataclasses

    from vltrain.model.catalog import count_parameters as count_on_meta

    cfg, _ = compose_plan([f"model={name}", "sft_type=full", "parallel=zero3"])
    counts = count_parameters(cfg)
    assert counts.intermediate == active
    assert sum(counts.total.values()) == count_on_meta(cfg.model.arch)["total"]
    est = estimate(cfg, counts, world_size=8, tiles=13)
    assert est.weights == pytest.approx(2 * sum(counts.total.values()) / 8)
    one_expert = estimate(cfg, dataclasses.replace(counts, intermediate=active // 4), world_size=8, tiles=13)
    L = cfg.data.max_length
    per_layer = L * 4 * (active - active // 4) * 2  # the 4i term of one layer's activations, bf16
    assert est.activations - one_expert.activations in (per_layer, counts.llm_layers * per_layer)
