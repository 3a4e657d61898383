"""Checkpoints: published complete or not at all, rotation that keeps the newest, a full disk, the data manifest, the
resumed config, and a checkpoint that still loads after being copied away from its run folder."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch

from vltrain.config import ConfigError, compose_config
from vltrain.data.collator import collate
from vltrain.data.demo import write_demo_dataset
from vltrain.data.specs import load_splits
from vltrain.manifest import (
    COMPLETE_FILE,
    complete_checkpoints,
    data_manifest,
    find_resume_point,
    manifest_changes,
    newest_checkpoint,
)
from vltrain.model.load import load_checkpoint, make_encoder
from vltrain.train import checkpoint as ckpt_mod
from vltrain.train.checkpoint import CheckpointError, publish, rotate, staging_dir


def stage(run_dir: Path, step: int, payload: bytes = b"weights") -> Path:
    staged = staging_dir(run_dir) / f"checkpoint-{step}"
    staged.mkdir(parents=True)
    (staged / "model.safetensors").write_bytes(payload)
    return staged


def make_checkpoint(run_dir: Path, step: int) -> Path:
    return publish(stage(run_dir, step), run_dir, {"vltrain.yaml": "x: 1\n"}, step, 1, "single")


def test_publish_makes_a_complete_checkpoint_and_only_complete_ones_count(tmp_path):
    first = make_checkpoint(tmp_path, 2)
    assert first == tmp_path / "checkpoint-2" and not (tmp_path / ".staging").exists()
    record = json.loads((first / COMPLETE_FILE).read_text())
    assert record["step"] == 2 and record["files"]["model.safetensors"] == len(b"weights")
    # a folder without the completion file (the Trainer's own layout, or a kill) and a truncated file do not count
    (tmp_path / "checkpoint-6").mkdir()
    (tmp_path / "checkpoint-6" / "model.safetensors").write_bytes(b"w")
    truncated = make_checkpoint(tmp_path, 4)
    assert newest_checkpoint(tmp_path) == truncated
    (truncated / "model.safetensors").write_bytes(b"w")
    assert complete_checkpoints(tmp_path) == [first]
    assert find_resume_point(str(tmp_path), "unused").checkpoint == first  # a run folder: its newest complete one
    with pytest.raises(ConfigError, match="incomplete checkpoint"):
        find_resume_point(str(truncated), str(tmp_path))


def test_rotation_keeps_the_newest_complete_checkpoint(tmp_path):
    for step in (2, 4, 6):
        make_checkpoint(tmp_path, step)
    (tmp_path / "checkpoint-8").mkdir()  # incomplete: never counted, never the reason to delete a complete one
    rotate(tmp_path, 1)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]
    make_checkpoint(tmp_path, 10)
    rotate(tmp_path, 2, keep=[tmp_path / "checkpoint-6"])  # the best checkpoint is kept too
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-6", "checkpoint-10"]
    make_checkpoint(tmp_path, 4)  # written by a run resumed from an older checkpoint: kept with the newest
    rotate(tmp_path, 1, keep=[tmp_path / "checkpoint-4"])
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-10"]
    rotate(tmp_path, None)
    assert len(complete_checkpoints(tmp_path)) == 2


def test_full_disk_while_publishing_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    previous = make_checkpoint(tmp_path, 2)
    staged = stage(tmp_path, 4)

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ckpt_mod, "write_atomic", full)
    with pytest.raises(CheckpointError, match=r"checkpoint-4: the disk is full.*checkpoint-2 is the newest"):
        publish(staged, tmp_path, {"vltrain.yaml": "x"}, 4, 1, "single")
    assert not staged.exists() and not (tmp_path / "checkpoint-4").exists()
    assert complete_checkpoints(tmp_path) == [previous]


def test_manifest_names_what_changed(tmp_path):
    data = tmp_path / "a.jsonl"
    data.write_text('{"query": "q", "response": "r"}\n')
    before = data_manifest([str(data)], [(str(data), 1)])
    assert before["files"][0]["size"] == data.stat().st_size and len(before["files"][0]["sha256"]) == 64
    assert manifest_changes(before, data_manifest([str(data)], [(str(data), 1)])) == []
    data.write_text('{"query": "q", "response": "other"}\n')
    changes = manifest_changes(before, data_manifest([str(data)], [(str(data), 2)]))
    assert any("a.jsonl changed" in c for c in changes) and any("held-out split changed" in c for c in changes)


def save_config_checkpoint(tmp_path: Path, cfg) -> Path:
    """A complete checkpoint-4 whose saved config is `cfg`'s."""
    from vltrain.config import run_config_yaml

    return publish(stage(tmp_path, 4), tmp_path, {"vltrain.yaml": run_config_yaml(cfg)}, 4, 1, "single")


def test_resume_keeps_what_is_trained_and_allows_harmless_changes(tmp_path):
    cfg = compose_config(["trainer.max_steps=10"], run_dir=str(tmp_path))
    save_config_checkpoint(tmp_path, cfg)
    # the one resolution of a resumed run: the saved config, the command line's harmless keys, refusals
    resumed = compose_config(["trainer.max_steps=20", "trainer.logging_steps=1", "trainer.save_steps=3",
                              "trainer.dataloader_num_workers=0", "eval.generate_samples=2", "resume=auto"],
                             run_dir=str(tmp_path))
    assert resumed.trainer["max_steps"] == 20 and resumed.trainer["logging_steps"] == 1
    for override, key in [("sft_type=full", "sft_type.name"), ("trainer.learning_rate=1e-3", "learning_rate"),
                          ("trainer.per_device_train_batch_size=2", "per_device_train_batch_size"),
                          ("model.max_tiles=2", "model.max_tiles"), ("dataset.val_ratio=0.1", "val_ratio")]:
        with pytest.raises(ConfigError, match=key):
            compose_config(["trainer.max_steps=10", override, "resume=auto"], run_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="already at step 4"):
        compose_config(["trainer.max_steps=3", "resume=auto"], run_dir=str(tmp_path))


def test_resume_from_checkpoint_key_points_to_resume():
    with pytest.raises(ConfigError, match="resume=auto"):
        compose_config(["trainer.resume_from_checkpoint=outputs/x/checkpoint-10"])


# ---- with training -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo"), n_train=16, n_val=4)


def small_run(tmp_path: Path, demo, sft: str, steps: int = 2, extra: tuple = ()):
    return compose_config([
        f"sft_type={sft}", "dataset=custom", f"dataset.train=[{demo.train}]", f"dataset.val=[{demo.val}]",
        "eval.generate_samples=0", "global_batch_size=2", "trainer.per_device_train_batch_size=2",
        f"trainer.max_steps={steps}", "trainer.save_steps=2", "trainer.eval_strategy=no",
        "trainer.dataloader_num_workers=0", "trainer.activation_checkpointing=false", *extra,
    ], run_dir=str(tmp_path / "run"))


def logits(model, cfg, tokenizer) -> torch.Tensor:
    _, val = load_splits(cfg.dataset)
    batch = collate([make_encoder(cfg, model, tokenizer)(r) for r in val[:2]], tokenizer.pad_token_id)
    batch.pop("labels"), batch.pop("tiles_per_sample")
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.slow
@pytest.mark.parametrize("sft", ["lora", "full"])
def test_checkpoint_copied_elsewhere_still_loads(tmp_path, demo, sft):
    from vltrain.train.recipe import build_trainer

    cfg = small_run(tmp_path, demo, sft)
    trainer = build_trainer(cfg)
    trainer.train()
    run = Path(cfg.run_dir)
    ckpt = run / "checkpoint-2"
    manifest = json.loads((ckpt / "data_manifest.json").read_text())
    assert [f["path"] for f in manifest["files"]] == [str(demo.train.resolve()), str(demo.val.resolve())]
    assert len(manifest["val_keys"]) == 4 and manifest["val_keys"][0] == [str(demo.val.resolve()), 1]
    if sft == "lora":  # plain peft finds the base while the run folder exists
        assert json.loads((ckpt / "adapter_config.json").read_text())["base_model_name_or_path"] == \
            str(run / "base_model")
    moved = tmp_path / "elsewhere" / "checkpoint-2"
    shutil.copytree(ckpt, moved)
    trained = logits(trainer.model, cfg, trainer.processing_class)
    shutil.rmtree(run)  # the run folder, its base model included, is gone
    model, tokenizer, saved = load_checkpoint(moved)
    assert torch.equal(logits(model, saved, tokenizer), trained)


@pytest.mark.slow
def test_full_disk_during_a_training_save(tmp_path, demo, monkeypatch):
    """The second save fails as a full disk does in torch.save; the first checkpoint stays, nothing half-written."""
    from vltrain.train.recipe import build_trainer

    trainer = build_trainer(small_run(tmp_path, demo, "lora", steps=4))
    real_save, calls = torch.save, []

    def failing_save(obj, f, *args, **kwargs):
        if "checkpoint-4" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
                               "file data/0: file write failed")
        calls.append(str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CheckpointError, match="checkpoint-4: the disk is full.*checkpoint-2 is the newest"):
        trainer.train()
    run = Path(trainer.args.output_dir)
    assert [p.name for p in complete_checkpoints(run)] == ["checkpoint-2"]
    assert not (run / "checkpoint-4").exists() and not list((run / ".staging").glob("*"))
