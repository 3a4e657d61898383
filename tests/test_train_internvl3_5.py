"""A few training steps of tiny random InternVL3.5-style models, built from `model.arch` overrides of the tiny type:
a Qwen3 LLM (q/k norm, tied embeddings), a Qwen3-MoE LLM and a GPT-OSS LLM (attention sinks, sliding and full
layers, eager attention), with LoRA (on the experts too) and full fine-tuning, the square loss and packing as the
official 3.5 SFT recipe trains them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vltrain.config import ConfigError, TrainConfig, compose_config
from vltrain.data.collator import model_inputs
from vltrain.data.demo import write_demo_dataset
from vltrain.model.load import load_checkpoint
from vltrain.train.loss import recorded_router_logits, router_aux_loss, weighted_lm_loss
from vltrain.train.recipe import build_trainer

pytestmark = pytest.mark.slow

LLM = {
    "qwen3": ["model.arch.llm.model_type=qwen3", "+model.arch.llm.head_dim=24",
              "+model.arch.llm.tie_word_embeddings=true"],
    "qwen3_moe": ["model.arch.llm.model_type=qwen3_moe", "+model.arch.llm.head_dim=24",
                  "+model.arch.llm.num_experts=4", "+model.arch.llm.num_experts_per_tok=2",
                  "+model.arch.llm.moe_intermediate_size=64", "+model.arch.llm.output_router_logits=true",
                  "+model.arch.llm.router_aux_loss_coef=0.02"],
    "gpt_oss": ["model.arch.llm.model_type=gpt_oss", "+model.arch.llm.head_dim=24",
                "model.arch.llm.intermediate_size=64", "+model.arch.llm.num_local_experts=4",
                "+model.arch.llm.num_experts_per_tok=2", "+model.arch.llm.sliding_window=64"],
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo"), n_train=32, n_val=4)


def run_config(tmp_path: Path, demo, llm: str, sft: str, *extra: str) -> TrainConfig:
    return compose_config([
        *LLM[llm], f"sft_type={sft}", "dataset=custom", f"dataset.train=[{demo.train}]", f"dataset.val=[{demo.val}]",
        "data.packing=true", "data.max_length=400", "loss_reduction=square", "model.max_tiles=2",
        "eval.generate_samples=0", "global_batch_size=2", "trainer.per_device_train_batch_size=1",
        "trainer.learning_rate=3e-3", "trainer.max_steps=8", "trainer.logging_steps=1", "trainer.eval_steps=8",
        "trainer.save_steps=8", "trainer.warmup_steps=0", "trainer.lr_scheduler_type=constant",
        "trainer.dataloader_num_workers=0", "trainer.seed=0", *extra,
    ], run_dir=str(tmp_path / "run"))


def train_rows(cfg: TrainConfig) -> list[dict]:
    trainer = build_trainer(cfg)
    trainer.train()
    rows = [json.loads(line) for line in (Path(cfg.run_dir) / "logging.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def assert_learns(rows: list[dict]) -> list[float]:
    losses = [r["loss"] for r in rows]
    assert len(losses) == 8 and all(map(torch.isfinite, torch.tensor(losses))), losses
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses
    return losses


def test_qwen3_full_square_loss_from_the_first_step(tmp_path, demo):
    """Full fine-tuning of the Qwen3 model (tied embeddings, vision tower trained) with packing and the square loss;
    the first logged loss is the mean, over the step's accumulated packs, of each pack's square-weighted loss
    computed here on the untrained model."""
    cfg = run_config(tmp_path, demo, "qwen3", "full", "trainer.weight_decay=0")  # only gradients move weights
    trainer = build_trainer(cfg)
    model = trainer.model
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert trainer.args.gradient_accumulation_steps == 2
    loader = trainer.get_train_dataloader()
    batches = [trainer._prepare_inputs(b) for _, b in zip(range(2), loader)]
    assert all(len(b["sample_lengths"]) > 1 for b in batches)  # packs of several records
    with torch.no_grad():
        expected = sum(weighted_lm_loss(model(**{k: v for k, v in model_inputs(b).items() if k != "labels"}).logits,
                                        b["labels"], "square", b["sample_lengths"]) for b in batches) / 2
    vision_before = model.model.vision_tower.embeddings.patch_embeddings.projection.weight.detach().clone()
    trainer.train()
    rows = [json.loads(line) for line in (Path(cfg.run_dir) / "logging.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert rows[0]["loss"] == pytest.approx(expected.item(), rel=1e-4)
    assert "router_aux_loss" not in rows[0]
    assert_learns(rows)
    vision_after = model.model.vision_tower.embeddings.patch_embeddings.projection.weight
    assert not torch.equal(vision_before, vision_after)  # the 3.5 recipe trains the vision tower


def test_qwen3_lora_checkpoint_reloads_tied(tmp_path, demo):
    cfg = run_config(tmp_path, demo, "qwen3", "lora")
    assert_learns(train_rows(cfg))
    model, _, saved = load_checkpoint(Path(cfg.run_dir) / "checkpoint-8")
    base = model.get_base_model()
    assert base.lm_head.weight is base.model.language_model.embed_tokens.weight
    assert saved.loss_reduction == "square"


@pytest.mark.parametrize("reduction", ["token", "square"])
def test_moe_first_loss_adds_the_router_loss_per_micro_batch(tmp_path, demo, reduction):
    """The first logged loss of a Qwen3-MoE run (2 accumulated packs): the language-model loss of the step (token:
    the mean over both packs' trained tokens; square: the mean of each pack's weighted loss) plus the coefficient
    times the mean of the packs' router losses, all computed here on the untrained model."""
    cfg = run_config(tmp_path, demo, "qwen3_moe", "full", f"loss_reduction={reduction}")
    trainer = build_trainer(cfg)
    model = trainer.model
    assert trainer.router_aux_coef == 0.02
    batches = [trainer._prepare_inputs(b) for _, b in zip(range(2), trainer.get_train_dataloader())]
    text = model.config.text_config
    numerators, counts, aux = [], [], []
    with torch.no_grad():
        for b in batches:
            with recorded_router_logits(model, text) as logits:
                out = model(**{k: v for k, v in model_inputs(b).items() if k != "labels"}).logits
            aux.append(router_aux_loss(logits, text))
            if reduction == "square":
                numerators.append(weighted_lm_loss(out, b["labels"], "square", b["sample_lengths"]))
            else:
                numerators.append(torch.nn.functional.cross_entropy(
                    out[0, :-1], b["labels"][0, 1:], ignore_index=-100, reduction="sum"))
                counts.append((b["labels"][0, 1:] != -100).sum())
    lm = sum(numerators) / (sum(counts) if counts else 2)
    expected = lm + 0.02 * sum(aux) / 2
    trainer.train()
    rows = [json.loads(line) for line in (Path(cfg.run_dir) / "logging.jsonl").read_text().splitlines()]
    first = next(r for r in rows if "loss" in r)
    assert first["loss"] == pytest.approx(expected.item(), rel=1e-4)
    assert first["router_aux_loss"] == pytest.approx((sum(aux) / 2).item(), rel=1e-4)


@pytest.mark.parametrize("llm", ["qwen3_moe", "gpt_oss"])
def test_moe_full_fine_tuning_adds_the_router_loss(tmp_path, demo, llm):
    rows = train_rows(run_config(tmp_path, demo, llm, "full"))
    assert_learns(rows)
    aux = [r["router_aux_loss"] for r in rows]
    # the balanced value is 1 per layer-token average (num_experts x sum of share x probability)
    assert all(0.5 < a < 4.0 for a in aux), aux


@pytest.mark.parametrize("llm", ["qwen3_moe", "gpt_oss"])
def test_moe_lora_on_experts_trains_and_reloads(tmp_path, demo, llm):
    cfg = run_config(tmp_path, demo, llm, "lora", "sft_type.lora_experts=true", "sft_type.lora_dropout=0")
    trainer = build_trainer(cfg)
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any(".mlp.experts." in n and "lora_A" in n for n in trained)
    assert any(".self_attn.q_proj.lora_A" in n for n in trained)
    assert not any("router" in n or ".mlp.gate." in n for n in trained)  # routers stay as they are
    trainer.train()
    rows = [json.loads(line) for line in (Path(cfg.run_dir) / "logging.jsonl").read_text().splitlines()]
    assert_learns([r for r in rows if "loss" in r])
    model, tokenizer, _ = load_checkpoint(Path(cfg.run_dir) / "checkpoint-8")
    ids = tokenizer("a tiny question", return_tensors="pt").input_ids
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, trainer.model(input_ids=ids).logits)


def test_router_loss_is_off_for_qwen3_moe_unless_its_config_asks(tmp_path, demo):
    overrides = [o for o in LLM["qwen3_moe"] if "output_router_logits" not in o]
    cfg = compose_config([*overrides, "dataset=custom", f"dataset.train=[{demo.train}]", "dataset.val_ratio=0",
                          "trainer.max_steps=1", "trainer.dataloader_num_workers=0", "global_batch_size=1"],
                         run_dir=str(tmp_path / "run"))
    trainer = build_trainer(cfg)
    assert trainer.router_aux_coef == 0.0
    trainer.train()
    rows = [json.loads(line) for line in (Path(cfg.run_dir) / "logging.jsonl").read_text().splitlines()]
    assert not any("router_aux_loss" in r for r in rows)


def test_lora_experts_needs_experts_and_no_dropout(tmp_path, demo):
    with pytest.raises(ConfigError, match="lora_dropout=0"):
        run_config(tmp_path, demo, "qwen3_moe", "lora", "sft_type.lora_experts=true")
    cfg = run_config(tmp_path, demo, "qwen3", "lora", "sft_type.lora_experts=true", "sft_type.lora_dropout=0")
    with pytest.raises(ConfigError, match="no fused expert weights"):
        build_trainer(cfg)


@pytest.mark.multiprocess
@pytest.mark.parametrize("parallel", ["ddp", "zero3"])
def test_square_loss_and_router_loss_on_two_processes(tmp_path, demo, parallel):
    """Two gloo processes (torchrun; DDP, and ZeRO-3 with its partitioned routers): the weights' sum is averaged
    across the ranks inside every micro-batch's loss and the router loss across the ranks at every log; both
    collectives run on every rank in step."""
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vltrain",
           *LLM["qwen3_moe"], f"parallel={parallel}", "sft_type=full", "dataset=custom", f"dataset.train=[{demo.train}]",
           "dataset.val_ratio=0", "data.packing=true", "data.max_length=400", "loss_reduction=square",
           "model.max_tiles=2", "global_batch_size=4", "trainer.max_steps=3", "trainer.logging_steps=1",
           "trainer.save_steps=3", "trainer.dataloader_num_workers=0", f"hydra.run.dir={run}"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    logged = [json.loads(line) for line in (run / "logging.jsonl").read_text().splitlines()] \
        if (run / "logging.jsonl").is_file() else []
    assert (run / "checkpoint-3").is_dir(), (out.stdout + out.stderr)[-4000:]
    assert next(r for r in logged if "world_size" in r)["world_size"] == 2
    steps = [r for r in logged if "loss" in r]
    assert len(steps) == 3 and all(torch.isfinite(torch.tensor([r["loss"], r["router_aux_loss"]])).all()
                                   for r in steps), steps
