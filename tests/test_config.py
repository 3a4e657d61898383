"""Config: every model x sft_type x parallel file composes and validates; bad keys and types are clear errors."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest

from vltrain.config import ConfigError, TrainConfig, check_overrides, compose_config, training_defaults, validate

CONF = Path(__file__).resolve().parents[1] / "vltrain" / "conf"


def names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def composed(*overrides: str) -> TrainConfig:
    return compose_config(list(overrides), run_dir="/tmp/vltrain-test-run")


def test_groups_exist():
    assert "tiny" in names("model")
    assert names("sft_type") == ["full", "lora"]
    assert "single" in names("parallel")
    assert names("logger") == ["none", "tensorboard", "wandb"]


@pytest.mark.parametrize("model,sft,parallel", itertools.product(names("model"), names("sft_type"), names("parallel")))
def test_every_combination_composes(model, sft, parallel):
    overrides = [f"model={model}", f"sft_type={sft}", f"parallel={parallel}"]
    if model != "tiny":  # real types need weights: a path that would be downloaded or read later
        overrides += ["dataset=custom", "dataset.train=[data.jsonl]"]
    if model.endswith("-int8") and sft == "full":
        with pytest.raises(ConfigError, match="8-bit weights cannot be trained directly; use sft_type=lora"):
            composed(*overrides)
        return
    if model.endswith("-int8") and parallel.startswith("zero"):
        with pytest.raises(ConfigError, match="8-bit weights cannot be partitioned by DeepSpeed ZeRO"):
            composed(*overrides)
        return
    cfg = composed(*overrides)
    assert cfg.model.name == model and cfg.sft_type.name == sft and cfg.parallel.name == parallel
    args = training_defaults(cfg)
    assert args["learning_rate"] > 0


def test_defaults_match_ms_swift():
    cfg = composed("dataset=custom", "dataset.train=[a.jsonl]")
    t = training_defaults(cfg)
    assert t["learning_rate"] == 1e-4 and t["gradient_accumulation_steps"] == 16
    assert t["eval_steps"] == 50 and t["save_steps"] == 50 and t["lr_scheduler_type"] == "cosine"
    assert (cfg.sft_type.lora_rank, cfg.sft_type.lora_alpha, cfg.sft_type.lora_dropout) == (8, 32, 0.05)
    assert cfg.data.max_length == 2048
    full = training_defaults(composed("dataset=custom", "dataset.train=[a.jsonl]", "sft_type=full"))
    assert full["learning_rate"] == 1e-5 and full["eval_steps"] == 200
    two_per_device = composed("dataset=custom", "dataset.train=[a.jsonl]", "trainer.per_device_train_batch_size=2")
    assert training_defaults(two_per_device, world_size=2)["gradient_accumulation_steps"] == 4


def test_recipe_applies_only_to_its_pair():
    assert composed().trainer["learning_rate"] == 5e-3  # tiny + demo recipe
    assert composed("dataset=custom", "dataset.train=[a.jsonl]").trainer["learning_rate"] is None
    assert composed("trainer.learning_rate=0.01").trainer["learning_rate"] == 0.01  # command line wins


def base_dict() -> dict:
    return {"model": {"name": "tiny", "init": "random"}, "dataset": {"train": ["a.jsonl"]}, "run_dir": "/tmp/r"}


def test_unknown_key_suggests_close_match():
    data = base_dict()
    data["model"]["max_tile"] = 4
    with pytest.raises(ConfigError, match=r"model\.max_tile: unknown key \(did you mean 'max_tiles'\?\)"):
        validate(data)


def test_wrong_type_names_key():
    data = base_dict()
    data["model"]["max_tiles"] = "many"
    with pytest.raises(ConfigError, match=r"model\.max_tiles: expected int, got str 'many'"):
        validate(data)
    data = base_dict()
    data["sft_type"] = {"name": "lorra"}
    with pytest.raises(ConfigError, match=r"sft_type\.name: 'lorra' is not one of lora, full \(did you mean 'lora'\?\)"):
        validate(data)


def test_trainer_keys_are_training_arguments():
    data = base_dict()
    data["trainer"] = {"learning_rat": 1e-3}
    with pytest.raises(ConfigError, match=r"trainer\.learning_rat: not a TrainingArguments field \(did you mean 'learning_rate'\?\)"):
        validate(data)


def test_cross_field_checks():
    data = base_dict()
    data["sft_type"] = {"name": "lora", "freeze_vision": True}
    with pytest.raises(ConfigError, match="apply to sft_type=full"):
        validate(data)
    with pytest.raises(ConfigError, match="model.path is required"):
        validate({"model": {"name": "internvl2-8b"}, "dataset": {"train": ["a.jsonl"]}})


def test_thinking_needs_a_template_with_a_thinking_mode_and_no_explicit_system():
    data = base_dict()
    data["model"] = {**data.get("model", {}), "template": "internvl2_5", "thinking": True}
    assert validate(data).model.thinking is True
    data["model"]["template"] = "internvl3_5_gpt_oss"
    with pytest.raises(ConfigError, match="model.thinking=true: template 'internvl3_5_gpt_oss' has no thinking mode"):
        validate(data)
    data["model"] |= {"template": "internvl2_5", "system": "Be brief."}
    with pytest.raises(ConfigError, match="model.thinking=true sets the system message"):
        validate(data)


def test_command_line_typo_is_caught_before_composing():
    check_overrides(["model=tiny", "trainer.learning_rate=1e-3", "model.arch.vision.hidden_size=32", "-m"])
    with pytest.raises(ConfigError, match=r"sft_type\.lora_rnak: unknown config key \(did you mean 'sft_type\.lora_rank'\?\)"):
        check_overrides(["sft_type.lora_rnak=4"])


def test_cli_reports_one_clear_error(tmp_path):
    # Run from tmp_path: a value error is found inside the Hydra job, after Hydra made its run folder.
    out = subprocess.run([sys.executable, "-m", "vltrain", "model.max_tile=3"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode != 0
    assert "vltrain: config error: model.max_tile: unknown config key (did you mean 'model.max_tiles'?)" in out.stderr
    assert "Traceback" not in out.stderr
    out = subprocess.run([sys.executable, "-m", "vltrain", "model.max_tiles=many"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "model.max_tiles" in out.stderr
