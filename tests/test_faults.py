"""Numerical faults: a NaN injected into one batch stops the run naming the step and its records (or skips that
step with `on_nonfinite=skip`), and nothing non-finite reaches the weights or a checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from vltrain.config import compose_config
from vltrain.data.demo import write_demo_dataset
from vltrain.manifest import complete_checkpoints
from vltrain.train.recipe import build_trainer
from vltrain.train.trainer import NumericalFault

pytestmark = pytest.mark.slow

POISONED_STEP = 3


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo"), n_train=16, n_val=0)


def poisoned_trainer(tmp_path: Path, demo, policy: str):
    """A trainer whose batch of optimizer step POISONED_STEP has NaN pixels (or NaN embeddings when text-only)."""
    cfg = compose_config([
        "sft_type=full", "dataset=custom", f"dataset.train=[{demo.train}]", "dataset.val_ratio=0",
        "global_batch_size=2", "trainer.per_device_train_batch_size=2", "trainer.max_steps=4",
        "trainer.save_steps=2", "trainer.eval_strategy=no", "trainer.dataloader_num_workers=0",
        "trainer.activation_checkpointing=false", f"on_nonfinite={policy}",
    ], run_dir=str(tmp_path / "run"))
    trainer = build_trainer(cfg)
    collator, seen, poisoned = trainer.data_collator, [], {}

    def poison(items):
        batch = collator(items)
        seen.append(1)
        if len(seen) == POISONED_STEP:
            poisoned["records"] = [trainer.train_dataset.where[i] for i in batch["record_index"]]
            if "pixel_values" in batch:
                batch["pixel_values"] = torch.full(batch["pixel_values"].shape, float("nan"))  # was uint8
            else:  # a text-only batch: NaN in its token embeddings
                poisoned["embeddings"] = True
        return batch

    def nan_embeddings(module, args, output):
        return output * float("nan") if poisoned.pop("embeddings", False) else output

    trainer.model.get_input_embeddings().register_forward_hook(nan_embeddings)
    trainer.data_collator = poison
    return trainer, poisoned


def all_finite(model) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_stops_the_run_naming_step_and_records(tmp_path, demo):
    trainer, poisoned = poisoned_trainer(tmp_path, demo, "stop")
    with pytest.raises(NumericalFault) as fault:
        trainer.train()
    message = str(fault.value)
    assert f"at step {POISONED_STEP}" in message and "nothing from this step was applied" in message
    assert poisoned["records"] and all(where in message for where in poisoned["records"])
    assert all(":" in where and where.split(":")[-1].isdigit() for where in poisoned["records"])  # file:line
    assert all_finite(trainer.model)
    assert [p.name for p in complete_checkpoints(Path(trainer.args.output_dir))] == ["checkpoint-2"]


def test_nan_step_skipped_by_config(tmp_path, demo, caplog):
    trainer, poisoned = poisoned_trainer(tmp_path, demo, "skip")
    changed_at_bad_step = {}
    real_step = trainer._get_grad_norm

    def check_after(model, grad_norm=None):
        norm = real_step(model, grad_norm)
        if trainer.state.global_step + 1 == POISONED_STEP:
            changed_at_bad_step["grads"] = [p.grad for p in model.parameters() if p.grad is not None]
        return norm

    trainer._get_grad_norm = check_after
    with caplog.at_level(logging.WARNING, logger="vltrain.train.trainer"):
        result = trainer.train()
    assert result.global_step == 4 and all_finite(trainer.model)
    assert changed_at_bad_step["grads"] == []  # no gradient left for the optimizer: that step changed nothing
    assert any(f"at step {POISONED_STEP}" in r.message and "skipped" in r.message for r in caplog.records)
    assert poisoned["records"] and any(poisoned["records"][0] in r.message for r in caplog.records)
    assert [p.name for p in complete_checkpoints(Path(trainer.args.output_dir))] == ["checkpoint-2", "checkpoint-4"]
