"""The command line end to end: a Hydra multirun trains one run folder per job, with TensorBoard logging."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vltrain.data.demo import write_demo_dataset

pytestmark = pytest.mark.slow


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
