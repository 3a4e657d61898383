"""Launch plumbing without a cluster: torchrun commands (NPROC_PER_NODE, SLURM), `--local_rank` stripping, refused
combinations, DeepSpeed configs, the device map planner, the SLURM preset and its requeue, and a real preemption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vltrain.config import ConfigError, compose_config

REPO = Path(__file__).resolve().parent.parent


# ---- launchers ---------------------------------------------------------------------------------------------------


def test_local_rank_never_reaches_hydra(monkeypatch):
    from vltrain.cli import strip_local_rank

    monkeypatch.setenv("LOCAL_RANK", "unset")  # recorded, so that what strip_local_rank sets is undone
    monkeypatch.delenv("LOCAL_RANK")
    assert strip_local_rank(["--local_rank=1", "parallel=zero2"]) == ["parallel=zero2"]
    assert os.environ["LOCAL_RANK"] == "1"
    assert strip_local_rank(["parallel=zero3", "--local_rank", "0", "sft_type=full"]) == ["parallel=zero3",
                                                                                          "sft_type=full"]


def test_nproc_per_node_builds_torchrun(monkeypatch):
    from vltrain.cli.train import launch_request

    monkeypatch.setenv("LOCAL_RANK", "unset")
    monkeypatch.delenv("LOCAL_RANK")
    argv = ["parallel=zero2", "sft_type=full"]
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    cmd = launch_request(argv)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc_per_node=2" in cmd and "--standalone" in cmd
    assert cmd[-4:] == ["-m", "vltrain", "parallel=zero2", "sft_type=full"]
    for key, value in {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29600"}.items():
        monkeypatch.setenv(key, value)
    cmd = launch_request(argv)
    assert {"--nnodes=2", "--node_rank=1", "--master_addr=node0", "--master_port=29600"} <= set(cmd)
    monkeypatch.delenv("MASTER_ADDR")
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        launch_request(argv)
    monkeypatch.delenv("NPROC_PER_NODE")
    with pytest.raises(ConfigError, match="NNODES=2 without NPROC_PER_NODE"):
        launch_request(argv)  # several nodes asked for, one process started: refused, not ignored
    monkeypatch.setenv("LOCAL_RANK", "0")  # already one of torchrun's processes: nothing to start
    assert launch_request(argv) is None


def test_slurm_job_runs_torchrun_on_every_node(monkeypatch, tmp_path):
    from vltrain.sweep import slurm_torchrun_command

    scontrol = tmp_path / "scontrol"
    scontrol.write_text("#!/bin/sh\necho gpu-a01\necho gpu-a02\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    env = {"SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8", "SLURM_NODEID": "1",
           "SLURM_JOB_NODELIST": "gpu-a[01-02]"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cmd = slurm_torchrun_command(["parallel=zero3", "hydra.run.dir=/runs/x"])
    assert {"--nproc_per_node=8", "--nnodes=2", "--node_rank=1", "--master_addr=gpu-a01"} <= set(cmd)
    assert cmd[-2:] == ["parallel=zero3", "hydra.run.dir=/runs/x"]


def test_one_process_never_ignores_a_multi_process_request(tmp_path):
    from vltrain.train.parallel import check_launch

    base = ["dataset=custom", f"dataset.train=[{tmp_path / 'x.jsonl'}]"]
    with pytest.raises(ConfigError, match="NPROC_PER_NODE"):
        check_launch(compose_config([*base, "parallel=ddp"]), processes=1)
    with pytest.raises(ConfigError, match="parallel=ddp, zero2 or zero3"):
        check_launch(compose_config(base), processes=2)
    with pytest.raises(ConfigError, match="one process"):
        check_launch(compose_config([*base, "parallel=device_map"]), processes=2)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="none is visible"):
            check_launch(compose_config([*base, "parallel=device_map"]), processes=1)


def test_device_map_with_deepspeed_is_refused(tmp_path):
    base = ["dataset=custom", f"dataset.train=[{tmp_path / 'x.jsonl'}]"]
    with pytest.raises(ConfigError, match="cannot be combined with DeepSpeed"):
        compose_config([*base, "parallel=zero3", "model.device_max_memory=[15GB,15GB]"])
    with pytest.raises(ConfigError, match="cannot be combined with DeepSpeed"):
        compose_config([*base, "parallel=device_map", f"parallel.deepspeed={tmp_path / 'ds.json'}"])
    with pytest.raises(ConfigError, match="applies to parallel=device_map"):
        compose_config([*base, "model.device_max_memory=[15GB]"])


# ---- DeepSpeed config ----------------------------------------------------------------------------------------------


def test_deepspeed_yaml_and_user_json(tmp_path):
    from vltrain.train.parallel import DEEPSPEED_FILE, deepspeed_config, training_arguments

    base = ["dataset=custom", f"dataset.train=[{tmp_path / 'x.jsonl'}]", "trainer.per_device_train_batch_size=3",
            "global_batch_size=6"]
    cfg = compose_config([*base, "parallel=zero3"])
    config = deepspeed_config(cfg)
    assert config["zero_optimization"]["stage"] == 3 and config["train_batch_size"] == "auto"
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    kwargs = training_arguments(cfg, tmp_path, write=True)  # the Trainer fills `auto` (2-process tests run it)
    assert kwargs["deepspeed"] == config
    assert json.loads((tmp_path / DEEPSPEED_FILE).read_text()) == config  # as given, `auto` unfilled
    assert training_arguments(compose_config([*base, "parallel=ddp"]), tmp_path, write=False).get(
        "ddp_backend") in ("gloo", None)

    own = tmp_path / "ds.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True}, "train_batch_size": "auto"}))
    assert deepspeed_config(compose_config([*base, "parallel=zero2", f"parallel.deepspeed={own}"]))[
        "zero_optimization"] == {"stage": 2, "overlap_comm": True}
    own.write_text('{"zero_optimization": {"stage": 2},\n "x": }')
    with pytest.raises(ConfigError, match=r"ds.json:2: not valid JSON"):
        deepspeed_config(compose_config([*base, "parallel=zero2", f"parallel.deepspeed={own}"]))


def test_cpu_shim_is_inactive_with_cuda(monkeypatch):
    import accelerate.state as accelerate_state
    import torch

    from vltrain.train import parallel

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(parallel, "_SHIM_INSTALLED", False)
    before = accelerate_state.PartialState._prepare_backend
    parallel.cpu_deepspeed_shim()
    assert accelerate_state.PartialState._prepare_backend is before


# ---- device map ------------------------------------------------------------------------------------------------------


def test_device_map_keeps_layers_whole_and_vision_with_the_first_layers(tmp_path):
    from vltrain.model.load import load_model
    from vltrain.train.parallel import device_map_config, parse_size, plan_device_map

    cfg = compose_config(["model=internvl2-1b", "model.init=random", "dataset=custom",
                          f"dataset.train=[{tmp_path / 'x.jsonl'}]"])
    model = load_model(cfg.model, None, meta=True)  # fp32 on meta: 3.8 GB
    budget = {0: parse_size("2GB"), 1: parse_size("1GB"), 2: parse_size("2GB")}
    device_map = plan_device_map(model, budget)
    first = device_map["model.language_model.layers.0"]
    for name in ("model.vision_tower", "model.multi_modal_projector", "model.language_model.embed_tokens"):
        assert device_map[name] == first == 0
    layers = [device_map[f"model.language_model.layers.{i}"] for i in range(24)]
    assert layers == sorted(layers) and len(set(layers)) == 3  # in order, over every device
    assert device_map["lm_head"] == device_map["model.language_model.norm"] == 2
    assert not any(k.startswith("model.language_model.layers.0.") for k in device_map)  # no layer split
    with pytest.raises(ConfigError, match="does not fit"):
        plan_device_map(model, {0: parse_size("1GB"), 1: parse_size("1GB")})

    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"model.vision_tower": 0, "lm_head": 1}))
    given = compose_config(["parallel=device_map", f"model.device_map_config={mapping}", "dataset=custom",
                            f"dataset.train=[{tmp_path / 'x.jsonl'}]"])
    assert device_map_config(given.model) == {"model.vision_tower": 0, "lm_head": 1}


# ---- SLURM preset, preemption ------------------------------------------------------------------------------------------


def test_slurm_preset_composes_and_requeues_with_resume():
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    from hydra_plugins.vltrain_launcher import SlurmLauncher
    from vltrain.sweep import with_resume

    with initialize_config_module("vltrain.conf", version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.nodes=2"],
                      return_hydra_config=True)
    launcher_cfg = cfg.hydra.launcher
    assert launcher_cfg._target_ == "hydra_plugins.vltrain_launcher.SlurmLauncher"
    assert launcher_cfg.nodes == 2 and launcher_cfg.tasks_per_node == 1 and launcher_cfg.gpus_per_node == 8
    assert launcher_cfg.max_num_timeout > 0
    launcher = instantiate(launcher_cfg)
    assert isinstance(launcher, SlurmLauncher)
    requeued = launcher.checkpoint(["sft_type=full", "parallel=zero3"], "hydra.sweep.dir", 0, "job0", {})
    assert requeued.args[0] == ["sft_type=full", "parallel=zero3", "resume=auto"]
    assert with_resume(["a=1", "resume=auto"]) == ["a=1", "resume=auto"]


@pytest.mark.slow
def test_preemption_signal_saves_a_checkpoint(tmp_path):
    from vltrain.data.demo import write_demo_dataset

    demo = write_demo_dataset(tmp_path / "demo", n_train=64, n_val=2)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "vltrain", "dataset=custom", f"dataset.train=[{demo.train}]",
           f"dataset.val=[{demo.val}]", "trainer.max_steps=500", "trainer.save_steps=1000", "trainer.eval_steps=1000",
           "trainer.logging_steps=1", "global_batch_size=1", "trainer.dataloader_num_workers=0",
           "eval.generate_samples=0", f"hydra.run.dir={run}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = run / "logging.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and any('"loss"' in line for line in log.read_text().splitlines()):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    checkpoints = list(run.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and int(checkpoints[0].name.split("-")[1]) < 500, out[-2000:]
    assert (checkpoints[0] / "adapter_model.safetensors").is_file()
    assert (run / "PREEMPTED").is_file()
    assert json.loads((run / "final_metrics.json").read_text())["preempted"] is True


# ---- loading at scale --------------------------------------------------------------------------------------------------


def test_original_layout_is_converted_once_and_loads_the_same(tmp_path, monkeypatch, shared_tokenizers):
    import importlib.util

    import torch

    from vltrain.model.load import converted_copy, load_model
    from vltrain.model.vocab import load_tokenizer_for

    script = REPO / "scripts" / "make_tiny_original.py"
    spec = importlib.util.spec_from_file_location("make_tiny_original", script)
    maker = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = maker
    spec.loader.exec_module(maker)
    original = maker.make_checkpoint("qwen2", tmp_path / "original", shared_tokenizers)
    monkeypatch.setenv("VLTRAIN_CONVERTED_CACHE", str(tmp_path / "cache"))
    cfg = compose_config(["model=internvl2-1b", f"model.path={original}", "dataset=custom",
                          f"dataset.train=[{tmp_path / 'x.jsonl'}]"])
    tokenizer = load_tokenizer_for(cfg.model)
    first = converted_copy(original, tokenizer, cfg.model)
    stamp = (first / ".complete").stat().st_mtime_ns
    assert converted_copy(original, tokenizer, cfg.model) == first  # the second process reuses it
    assert (first / ".complete").stat().st_mtime_ns == stamp
    assert (first / "config.json").is_file() and list(first.glob("*.safetensors"))

    in_memory = load_model(cfg.model, tokenizer, torch.float32)
    from_copy = load_model(cfg.model, tokenizer, torch.float32, convert_once=True)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(in_memory(input_ids=ids).logits, from_copy(input_ids=ids).logits)


def test_device_map_loading_on_cpu(tmp_path):
    """The device-map path end to end where only the CPU exists: a planned (callable) map and an explicit one."""
    import torch

    from vltrain.model.load import load_model
    from vltrain.model.vocab import load_tokenizer_for

    cfg = compose_config(["dataset=custom", f"dataset.train=[{tmp_path / 'x.jsonl'}]"])
    tokenizer = load_tokenizer_for(cfg.model)
    planned = []

    def plan(model_on_meta):
        planned.append(next(model_on_meta.parameters()).device.type)
        return {"": "cpu"}

    random_model = load_model(cfg.model, tokenizer, torch.float32, device_map=plan)
    assert planned == ["meta"]
    random_model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    pretrained = compose_config(["model.init=pretrained", f"model.path={tmp_path / 'base'}", "dataset=custom",
                                 f"dataset.train=[{tmp_path / 'x.jsonl'}]"]).model
    loaded = load_model(pretrained, tokenizer, torch.float32, device_map={"": "cpu"})
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, random_model(input_ids=ids).logits)


@pytest.mark.slow
def test_slurm_preset_runs_through_submitit_local_executor(tmp_path):
    """The SLURM preset with submitit's local executor standing in for SLURM: the job runs, the sweep summarises."""
    from vltrain.data.demo import write_demo_dataset

    demo = write_demo_dataset(tmp_path / "demo", n_train=8, n_val=2)
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "vltrain", "-m", "hydra/launcher=slurm",
           "hydra.launcher._target_=hydra_plugins.vltrain_launcher.LocalLauncher", "hydra.launcher.gpus_per_node=0",
           "dataset=custom", f"dataset.train=[{demo.train}]", f"dataset.val=[{demo.val}]", "trainer.max_steps=1",
           "trainer.save_steps=1", "trainer.eval_steps=1", "global_batch_size=2", "trainer.dataloader_num_workers=0",
           "eval.generate_samples=1", "eval.max_new_tokens=2", f"hydra.sweep.dir={sweep}"]
    out = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert (sweep / "0-tiny-lora" / "checkpoint-1" / "adapter_model.safetensors").is_file()
    assert list((sweep / ".submitit").iterdir())  # it went through submitit
    assert "| 0-tiny-lora |" in (sweep / "summary.md").read_text()
