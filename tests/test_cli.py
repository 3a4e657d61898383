"""The command line end to end: every command's `--help`, the `vltrain` console script and `python -m vltrain`
giving the same run, and a Hydra multirun training one run folder per job, with TensorBoard logging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vltrain.cli import COMMANDS, main
from vltrain.data.demo import write_demo_dataset

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name, capsys):
    assert main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"vltrain {name}") and "Run as:" in out, out[:300]
    if name == "train":  # the config groups and their options, from vltrain/conf/
        assert "sft_type: full, lora" in out and "internvl2-8b" in out


def test_the_command_table(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in COMMANDS)
    assert main(["trian"]) == 2
    assert "unknown command 'trian' (did you mean 'train'?)" in capsys.readouterr().err


def test_module_shims_run_the_same_commands():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for args, head in [(["-m", "vltrain", "check", "--help"], "vltrain check"),
                       (["-m", "vltrain.check", "--help"], "vltrain check"),
                       (["-m", "vltrain.infer", "--help"], "vltrain infer"),
                       (["-m", "vltrain", "--help"], "usage: vltrain [command]")]:
        out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0 and out.stdout.startswith(head), (args, out.stderr[-2000:])


@pytest.mark.slow
def test_console_script_and_module_give_the_same_run(tmp_path):
    """`vltrain train ...` (the installed console script) and `python -m vltrain ...`: the same final metrics."""
    script = Path(sys.executable).parent / "vltrain"
    assert script.is_file(), f"{script}: the console script is not installed (pip install -e .)"
    demo = write_demo_dataset(tmp_path / "demo", n_train=8, n_val=2)
    args = ["dataset=custom", f"dataset.train=[{demo.train}]", f"dataset.val=[{demo.val}]", "trainer.max_steps=2",
            "global_batch_size=2", "trainer.eval_strategy=no", "trainer.save_steps=2",
            "trainer.dataloader_num_workers=0", "eval.generate_samples=2", "eval.max_new_tokens=2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    metrics = []
    for name, cmd in [("script", [str(script), "train"]), ("module", [sys.executable, "-m", "vltrain"])]:
        run = tmp_path / name
        out = subprocess.run([*cmd, *args, f"hydra.run.dir={run}"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=600, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        final = json.loads((run / "final_metrics.json").read_text())
        metrics.append({k: v for k, v in final.items() if not k.endswith(("_runtime", "_per_second"))})  # timings
    assert metrics[0]["global_step"] == 2 and {"train_loss", "eval_loss", "eval_exact_match"} <= metrics[0].keys()
    assert metrics[0] == metrics[1]


@pytest.mark.slow
def test_multirun_trains_each_job(tmp_path):
    demo = write_demo_dataset(tmp_path / "demo", n_train=16, n_val=4)
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable, "-m", "vltrain", "-m", "sft_type=lora,full", "logger=tensorboard",
        "dataset=custom", f"dataset.train=[{demo.train}]", f"dataset.val=[{demo.val}]",
        "trainer.max_steps=2", "trainer.save_steps=2", "trainer.eval_steps=2", "global_batch_size=2",
        "trainer.dataloader_num_workers=0", "eval.generate_samples=2", "eval.max_new_tokens=2",
        f"hydra.sweep.dir={sweep}",
    ]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lora, full = sweep / "0-tiny-lora", sweep / "1-tiny-full"
    assert (lora / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert (full / "checkpoint-2" / "model.safetensors").is_file()
    for job in (lora, full):
        assert (job / ".hydra" / "config.yaml").is_file() and (job / "logging.jsonl").is_file()
        assert list((job / "runs").rglob("events.out.tfevents.*")), "no TensorBoard events"
    assert "sft_type:\n  name: lora" in out.stdout  # the resolved config is printed
