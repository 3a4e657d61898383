"""Bad configuration is one line before any work: numbers the optimizer would refuse, a `data.max_length` beyond
the model's positions, a misspelt group option, disagreeing run folders, a folder that holds another run; and a
failed start leaves no run folder behind. Resuming refuses changed data unless forced."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vltrain.cli.train import settle_run_dir
from vltrain.config import ConfigError, check_overrides, compose_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("override,message", [
    ("trainer.learning_rate=-1e-4", "trainer.learning_rate must be >= 0, got -0.0001"),
    ("trainer.per_device_train_batch_size=0", "trainer.per_device_train_batch_size must be >= 1"),
    ("trainer.num_train_epochs=0", "trainer.num_train_epochs must be > 0"),
    ("trainer.max_steps=0", "trainer.max_steps=0 trains nothing"),
    ("trainer.adam_beta2=1.5", "trainer.adam_beta2 must be below 1"),
    ("trainer.learning_rate=fast", "trainer.learning_rate: expected a number"),
    ("resume_force=true", "resume_only_model / resume_force apply with resume"),
    ("on_nonfinite=ignore", "on_nonfinite: 'ignore' is not one of stop, skip"),
])
def test_bad_numbers_are_one_config_error(override, message):
    with pytest.raises(ConfigError) as e:
        compose_config([override])
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("parallel", ["zero2", "zero3", "zero3_offload"])
def test_8bit_with_zero_is_refused_before_any_work(parallel):
    with pytest.raises(ConfigError) as e:
        compose_config(["model.load_in_8bit=true", f"parallel={parallel}"])
    assert str(e.value).startswith("model.load_in_8bit: 8-bit weights cannot be partitioned by DeepSpeed ZeRO "
                                   f"(parallel={parallel})") and "\n" not in str(e.value)
    compose_config(["model.load_in_8bit=true", "parallel=ddp"])  # 8-bit LoRA on every process: fine


def test_max_length_beyond_the_model_positions():
    from vltrain.train.recipe import check_max_length

    check_max_length(compose_config(["data.max_length=4096"]))  # the tiny model's 4096 positions
    with pytest.raises(ConfigError, match="data.max_length=5000 exceeds the 4096 positions of model 'tiny'"):
        check_max_length(compose_config(["data.max_length=5000"]))


def test_misspelt_group_option_names_the_close_match():
    with pytest.raises(ConfigError, match=r"model=internvl2_8b: no such model \(did you mean 'internvl2-8b'\?\)"):
        check_overrides(["model=internvl2_8b"])
    with pytest.raises(ConfigError, match=r"did you mean 'internvl3_5-8b'"):
        check_overrides(["model=internvl3-5-8b"])
    with pytest.raises(ConfigError, match="sft_type=ful: no such sft_type"):
        check_overrides(["sft_type=lora,ful"])
    check_overrides(["model=internvl2-8b", "sft_type=lora,full"])


def test_one_run_folder(tmp_path):
    assert settle_run_dir([f"run_dir={tmp_path / 'x'}"]) == [f"hydra.run.dir={tmp_path / 'x'}"]
    with pytest.raises(ConfigError, match="disagree"):
        settle_run_dir([f"run_dir={tmp_path / 'x'}", f"hydra.run.dir={tmp_path / 'y'}"])
    with pytest.raises(ConfigError, match="not with -m"):
        settle_run_dir(["-m", f"run_dir={tmp_path / 'x'}"])
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "vltrain.yaml").write_text("x: 1\n")
    with pytest.raises(ConfigError, match="already holds a run; continue it with resume=auto"):
        settle_run_dir([f"hydra.run.dir={run}"])
    resumed = settle_run_dir([f"resume={run / 'checkpoint-4'}"])  # a checkpoint continues in its run folder
    assert f"hydra.run.dir={run}" in resumed and any(a.startswith("hydra.output_subdir=.hydra/resume-")
                                                     for a in resumed)
    with pytest.raises(ConfigError, match="in its own folder"):
        settle_run_dir([f"resume={run}", f"hydra.run.dir={tmp_path / 'other'}"])


def test_a_new_run_never_writes_into_another_run(tmp_path):
    from vltrain.train.recipe import start_run

    run = tmp_path / "run"
    run.mkdir()
    (run / "logging.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="already holds a run"):
        start_run(compose_config([], run_dir=str(run)))


@pytest.mark.slow
@pytest.mark.parametrize("override,line", [
    ("trainer.learning_rate=-1", "vltrain: config error: trainer.learning_rate must be >= 0, got -1"),
    ("model=internvl2_8b", "vltrain: config error: model=internvl2_8b: no such model (did you mean 'internvl2-8b'?)"),
])
def test_command_line_error_is_one_line_and_leaves_no_folder(tmp_path, override, line):
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "vltrain", override, f"hydra.run.dir={run}"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(line), out.stderr[-2000:]
    assert not run.exists()  # Hydra's .hydra/ and log of the failed start are gone too


@pytest.mark.slow
def test_resume_reads_safely_and_refuses_changed_data_unless_forced(tmp_path, caplog, monkeypatch):
    import torch

    from vltrain.data.demo import write_demo_dataset
    from vltrain.train.recipe import build_trainer

    demo = write_demo_dataset(tmp_path / "demo", n_train=8, n_val=0)
    args = ["dataset=custom", f"dataset.train=[{demo.train}]", "dataset.val_ratio=0.25", "global_batch_size=2",
            "trainer.per_device_train_batch_size=2", "trainer.max_steps=2", "trainer.save_steps=2",
            "trainer.eval_strategy=no", "trainer.dataloader_num_workers=0", "trainer.activation_checkpointing=false"]
    run = str(tmp_path / "run")
    build_trainer(compose_config(args, run_dir=run)).train()

    # an exact resume reads the pickled optimizer, scheduler and RNG states with weights_only=True only
    resumed = build_trainer(compose_config([*args, "trainer.max_steps=3", "resume=auto"], run_dir=run))
    assert resumed.resume_checkpoint == str(Path(run) / "checkpoint-2")
    real_load, loads = torch.load, []

    def spy(f, *a, **kw):
        loads.append((Path(str(f)).name, kw.get("weights_only")))
        return real_load(f, *a, **kw)

    monkeypatch.setattr(torch, "load", spy)
    assert resumed.train(resume_from_checkpoint=resumed.resume_checkpoint).global_step == 3
    monkeypatch.undo()
    assert {name for name, _ in loads} >= {"optimizer.pt", "scheduler.pt", "rng_state.pth"}
    assert all(safe is True for _, safe in loads), loads

    lines = demo.train.read_text().splitlines(keepends=True)
    demo.train.write_text("".join(lines[:-1]))  # one row fewer
    with pytest.raises(ConfigError, match=r"the data changed since checkpoint-3: .*train.jsonl changed"):
        build_trainer(compose_config([*args, "trainer.max_steps=5", "resume=auto"], run_dir=run))
    forced = build_trainer(compose_config([*args, "trainer.max_steps=5", "resume=auto", "resume_force=true",
                                           "resume_only_model=true"], run_dir=run))
    assert "resuming although the data changed" in caplog.text
    result = forced.train(resume_from_checkpoint=forced.resume_checkpoint)
    assert result.global_step == 5
    # resume_only_model: the step count went on from 3, the optimizer started afresh (2 Adam steps, not 5)
    assert {float(s["step"]) for s in forced.optimizer.state.values()} == {2.0}


@pytest.mark.slow
def test_resume_a_run_folder_from_the_command_line(tmp_path):
    """`python -m vltrain resume=<run folder>`: the saved config wins (no model or data overrides needed), a
    harmless override applies, one that changes what is trained is one line, and the run continues in its folder."""
    from vltrain.data.demo import write_demo_dataset
    from vltrain.train.recipe import build_trainer

    demo = write_demo_dataset(tmp_path / "demo", n_train=8, n_val=0)
    run = tmp_path / "run"
    build_trainer(compose_config([
        "sft_type=full", "dataset=custom", f"dataset.train=[{demo.train}]", "dataset.val_ratio=0",
        "global_batch_size=2", "trainer.per_device_train_batch_size=2", "trainer.max_steps=2", "trainer.save_steps=2",
        "trainer.eval_strategy=no", "trainer.dataloader_num_workers=0", "trainer.activation_checkpointing=false",
    ], run_dir=str(run))).train()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    refused = subprocess.run([sys.executable, "-m", "vltrain", f"resume={run}", "sft_type=lora"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300, env=env)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode != 0 and len(lines) == 1 and "sft_type.name ('full' -> 'lora')" in lines[0], lines
    out = subprocess.run([sys.executable, "-m", "vltrain", f"resume={run / 'checkpoint-2'}", "trainer.max_steps=3"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run / "checkpoint-3" / "model.safetensors").is_file()
    assert sorted(p.name for p in (run / ".hydra").iterdir() if p.name.startswith("resume-"))  # Hydra's, apart
    assert not (tmp_path / "outputs").exists()  # nothing went to a new run folder
