"""Smoke training: LoRA and full fine-tuning of the tiny model lower the loss and write reloadable checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vltrain.config import TrainConfig, compose_config
from vltrain.data.collator import collate
from vltrain.data.demo import write_demo_dataset
from vltrain.data.specs import load_splits
from vltrain.model.load import load_checkpoint, load_model_tokenizer, make_encoder
from vltrain.train.recipe import build_trainer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo"), n_train=48, n_val=8)


def run_config(tmp_path: Path, demo, sft: str) -> TrainConfig:
    return compose_config([
        f"sft_type={sft}", "dataset=custom", f"dataset.train=[{demo.train}]", f"dataset.val=[{demo.val}]",
        "eval.generate_samples=4", "eval.max_new_tokens=4", "global_batch_size=4",
        "trainer.learning_rate=3e-3", "trainer.max_steps=12", "trainer.per_device_train_batch_size=2",
        "trainer.logging_steps=1", "trainer.eval_steps=12", "trainer.save_steps=12", "trainer.warmup_steps=0",
        "trainer.lr_scheduler_type=constant", "trainer.dataloader_num_workers=0", "trainer.seed=0",
    ], run_dir=str(tmp_path / "run"))


def held_out_logits(model, cfg: TrainConfig, tokenizer) -> torch.Tensor:
    _, val = load_splits(cfg.dataset)
    encoder = make_encoder(cfg, model, tokenizer)
    batch = collate([encoder(r) for r in val[:2]], tokenizer.pad_token_id)
    batch.pop("labels"), batch.pop("tiles_per_sample")
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("sft", ["lora", "full"])
def test_training_lowers_loss_and_checkpoint_reloads(tmp_path, demo, sft):
    cfg = run_config(tmp_path, demo, sft)
    trainer = build_trainer(cfg)
    trainer.train()
    metrics = trainer.evaluate()
    run = Path(cfg.run_dir)
    rows = [json.loads(line) for line in (run / "logging.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    assert "eval_loss" in metrics and 0.0 <= metrics["eval_exact_match"] <= 1.0
    assert any("eval_exact_match" in r for r in rows)
    assert (run / "images" / "loss.png").stat().st_size > 1000

    ckpt = run / "checkpoint-12"
    weights = "adapter_model.safetensors" if sft == "lora" else "model.safetensors"
    for name in (weights, "vltrain.yaml", "trainer_state.json", "tokenizer.json"):
        assert (ckpt / name).is_file(), name
    assert not list(ckpt.glob("*model*.bin"))  # weights only as safetensors

    # The trained model in memory and the reloaded checkpoint give the same logits on held-out rows.
    reloaded, tokenizer, saved_cfg = load_checkpoint(ckpt)
    assert saved_cfg.sft_type.name == sft and saved_cfg.model.init == "pretrained"
    trained = held_out_logits(trainer.model, saved_cfg, tokenizer)
    again = held_out_logits(reloaded, saved_cfg, tokenizer)
    assert (trained - again).abs().max() <= 1e-6
    base, _ = load_model_tokenizer(saved_cfg.model)  # the saved random base: training moved away from it
    assert (held_out_logits(base, saved_cfg, tokenizer) - trained).abs().max() > 1e-3


@pytest.mark.parametrize("sft", ["lora", "full"])
def test_training_from_an_original_layout_checkpoint(tmp_path, demo, shared_tokenizers, sft):
    """`model=internvl2-1b model.path=<original InternVLChatModel folder>`: converted while loading, trained, and
    its checkpoint reloads onto the same base (the original folder, converted again) with the same logits.
    (Qwen2: InternLM2's dynamic rope keeps the longest length seen so far, so its logits depend on history.)"""
    import importlib.util
    import sys

    script = Path(__file__).resolve().parent.parent / "scripts" / "make_tiny_original.py"
    spec = importlib.util.spec_from_file_location("make_tiny_original", script)
    maker = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = maker
    spec.loader.exec_module(maker)
    original = maker.make_checkpoint("qwen2", tmp_path / "original", shared_tokenizers)

    cfg = compose_config([
        "model=internvl2-1b", f"model.path={original}", f"sft_type={sft}", "dataset=custom",
        f"dataset.train=[{demo.train}]", f"dataset.val=[{demo.val}]", "eval.generate_samples=2",
        "eval.max_new_tokens=3", "global_batch_size=2", "trainer.max_steps=3", "trainer.per_device_train_batch_size=2",
        "trainer.eval_steps=3", "trainer.save_steps=3", "trainer.dataloader_num_workers=0", "data.max_length=4096",
    ], run_dir=str(tmp_path / "run"))
    trainer = build_trainer(cfg)
    assert trainer.train().global_step == 3
    reloaded, tokenizer, saved_cfg = load_checkpoint(Path(cfg.run_dir) / "checkpoint-3")
    assert saved_cfg.model.path == str(original)
    trained = held_out_logits(trainer.model, saved_cfg, tokenizer)
    assert (trained - held_out_logits(reloaded, saved_cfg, tokenizer)).abs().max() <= 1e-5


def test_every_training_step_runs_in_training_mode_after_evaluations(tmp_path, demo):
    """The trainer skips the Trainer's per-step `model.train()` walk while the model is still training; after an
    evaluation (which switches the model to eval mode) every module must be back in training mode."""
    cfg = run_config(tmp_path, demo, "lora")
    cfg.trainer.update({"max_steps": 4, "eval_steps": 2, "save_steps": 100})
    trainer = build_trainer(cfg)
    model = trainer.model
    modes, walks = [], []  # every module in training mode at each training forward; the root's train(mode) calls

    def record(module, args, kwargs):
        if torch.is_grad_enabled():  # training forwards only (evaluation runs under no_grad)
            modes.append(all(m.training for m in model.modules()))

    model.register_forward_pre_hook(record, with_kwargs=True)
    train = type(model).train
    type(model).train = lambda self, mode=True: (walks.append(mode), train(self, mode))[1]
    try:
        trainer.train()
    finally:
        type(model).train = train
    assert modes == [True] * 4 * trainer.args.gradient_accumulation_steps, modes
    # evaluations at steps 2 and 4 switch the model to eval mode; it is walked back once, at step 3, and at none of
    # the other steps (it was built in training mode)
    assert walks.count(True) == 1 and walks.count(False) >= 2, walks
