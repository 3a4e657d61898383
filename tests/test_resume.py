"""Kill and resume: `python -m vltrain` killed with SIGKILL at a seeded moment (in a step, inside a save, before
and after a checkpoint is published, or after a random delay), resumed with `resume=auto` in the same folder,
ends with weights bitwise identical to an uninterrupted run. Two runs by default; `-m soak` runs 20 more."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from vltrain.data.demo import write_demo_dataset

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
MAX_STEPS = 6
SAVE_STEPS = 2

# Runs `python -m vltrain` and SIGKILLs itself at the moment KILL_WHERE / KILL_STEP name:
#   step     inside optimizer step KILL_STEP, after its backward pass (nothing of it saved)
#   save     inside the save of KILL_STEP, while the Trainer writes the optimizer state into the staging folder
#   publish  after the checkpoint of KILL_STEP is complete in the staging folder, before its rename
#   rotate   after checkpoint KILL_STEP is published, before older ones are rotated away
RUNNER = r"""
import os, signal, sys
import torch
import vltrain.train.checkpoint as checkpoint
import vltrain.train.trainer as trainer
where, step = os.environ.get("KILL_WHERE"), int(os.environ.get("KILL_STEP", "0"))
def die():
    os.kill(os.getpid(), signal.SIGKILL)
if where == "step":
    grad_norm = trainer.VLTrainer._get_grad_norm
    def _get_grad_norm(self, model, grad_norm=None):
        if self.state.global_step + 1 == step:
            die()
        return grad_norm_orig(self, model, grad_norm)
    grad_norm_orig, trainer.VLTrainer._get_grad_norm = grad_norm, _get_grad_norm
if where == "save":
    save = torch.save
    def torch_save(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt") and f"checkpoint-{step}" in str(f):
            with open(f, "wb") as out:
                out.write(b"half an optimizer")
            die()
        return save(obj, f, *args, **kwargs)
    torch.save = torch_save
if where == "publish":
    fsync = checkpoint._fsync_tree
    def _fsync_tree(folder):
        fsync(folder)
        if folder.name == f"checkpoint-{step}":
            die()
    checkpoint._fsync_tree = _fsync_tree
if where == "rotate":
    rotate = trainer.rotate
    def rotate_then_die(run_dir, *args, **kwargs):
        if (run_dir / f"checkpoint-{step}").is_dir():
            die()
        return rotate(run_dir, *args, **kwargs)
    trainer.rotate = rotate_then_die
if os.environ.get("SAMPLE_PIDS"):  # record the processes that make samples (they create the shared memory)
    import vltrain.data.dataset as dataset
    ready = dataset.ready_data_process
    def ready_recorded():
        with open(os.environ["SAMPLE_PIDS"], "a") as pids:
            pids.write(f"{os.getpid()}\n")
        ready()
    dataset.ready_data_process = ready_recorded
from vltrain.cli import entry
sys.argv = ["vltrain", *sys.argv[1:]]
if __name__ == "__main__":  # DataLoader workers import this file as __mp_main__ (fork server)
    entry()
"""


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    # 16 rows, 4 per step: checkpoint-4 ends epoch 0, checkpoint-6 is in the middle of epoch 1
    return write_demo_dataset(tmp_path_factory.mktemp("demo"), n_train=16, n_val=0)


def overrides(demo, sft: str) -> list[str]:
    return [
        f"sft_type={sft}", "dataset=custom", f"dataset.train=[{demo.train}]", "dataset.val_ratio=0",
        "global_batch_size=4", "trainer.per_device_train_batch_size=2", f"trainer.max_steps={MAX_STEPS}",
        f"trainer.save_steps={SAVE_STEPS}", "trainer.save_total_limit=1", "trainer.logging_steps=1",
        "trainer.eval_strategy=no", "trainer.learning_rate=3e-3", "trainer.activation_checkpointing=false",
        f"trainer.dataloader_num_workers={1 if sft == 'lora' else 0}", "trainer.seed=3",  # both feeding paths
    ]


def torch_segments(pids: set[int]) -> set[str]:
    """The /dev/shm segments torch's `file_system` sharing strategy made in the processes `pids`
    (`torch_<pid>_<random>_<counter>`)."""
    names = os.listdir("/dev/shm") if os.path.isdir("/dev/shm") else []
    return {n for n in names if (m := re.fullmatch(r"torch_(\d+)_\d+_\d+", n)) and int(m[1]) in pids}


def sample_pids(run_dir: Path) -> set[int]:
    path = run_dir.parent / "sample_pids.txt"
    return {int(line) for line in path.read_text().split()} if path.is_file() else set()


def assert_no_shared_memory_left(run_dir: Path, before: set[str]) -> None:
    """No segment of this run's sample-making processes is left in /dev/shm (torch's shared-memory manager unlinks
    them once its clients are gone, within a moment of the last one's end)."""
    pids = sample_pids(run_dir)
    deadline = time.monotonic() + 30
    while (left := torch_segments(pids) - before) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"{len(left)} shared-memory segments left in /dev/shm: {sorted(left)[:5]}"


def launch(run_dir: Path, args: list[str], kill: tuple[str, int] | None = None, resume: bool = False):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SAMPLE_PIDS": str(run_dir.parent / "sample_pids.txt")}
    if kill and kill[0] != "time":
        env |= {"KILL_WHERE": kill[0], "KILL_STEP": str(kill[1])}
    runner = run_dir.parent / "runner.py"  # a file, not -c: the workers import it too, so they record their pids
    runner.write_text(RUNNER, encoding="utf-8")
    cmd = [sys.executable, str(runner), *args, f"hydra.run.dir={run_dir}", *(["resume=auto"] if resume else [])]
    proc = subprocess.Popen(cmd, cwd=run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    if kill and kill[0] == "time":  # a random moment: once training has started, after a seeded delay
        deadline = time.monotonic() + 300
        while not (run_dir / "logging.jsonl").is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(kill[1] / 10)
        proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


def final_weights(run_dir: Path, sft: str) -> dict:
    name = "adapter_model.safetensors" if sft == "lora" else "model.safetensors"
    return load_file(run_dir / f"checkpoint-{MAX_STEPS}" / name)


_references: dict[str, dict] = {}


def reference(tmp_path_factory, demo, sft: str) -> dict:
    if sft not in _references:
        run_dir = tmp_path_factory.mktemp(f"reference-{sft}") / "run"
        code, out = launch(run_dir, overrides(demo, sft))
        assert code == 0, out[-3000:]
        _references[sft] = final_weights(run_dir, sft)
    return _references[sft]


def kill_plan(seed: int) -> list[tuple[str, int]]:
    """One or two kills at seeded moments, in order (a later kill falls after the checkpoint an earlier one
    leaves, so every kill interrupts progress)."""
    rng = random.Random(seed)
    plan = []
    for _ in range(rng.choice([1, 2])):
        where = rng.choice(["step", "save", "publish", "rotate", "time"])
        low = plan[-1][1] + 1 if plan and plan[-1][0] != "time" else 1
        if where in ("save", "publish", "rotate"):
            steps = [s for s in range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS) if s >= max(low, SAVE_STEPS)]
        else:
            steps = list(range(low, MAX_STEPS + 1))
        if where == "time":
            steps = list(range(0, 40))  # tenths of a second after training started
        if not steps:
            break
        plan.append((where, rng.choice(steps)))
    return plan


def check_killed_and_resumed(tmp_path, tmp_path_factory, demo, sft: str, seed: int) -> None:
    args = overrides(demo, sft)
    run_dir = tmp_path / "run"
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    plan = kill_plan(seed)
    for i, kill in enumerate(plan):
        code, out = launch(run_dir, args, kill, resume=i > 0)
        if code == 0:  # a timed kill that came after the end
            break
        assert code == -signal.SIGKILL, out[-3000:]
        if kill[0] in ("save", "publish"):  # the interrupted checkpoint is not visible; the one before is
            assert not (run_dir / f"checkpoint-{kill[1]}").exists()
    else:
        code, out = launch(run_dir, args, resume=True)
        assert code == 0, f"plan {plan}\n{out[-3000:]}"
        if plan and plan[-1][0] in ("save", "publish"):
            assert f"checkpoint-{plan[-1][1] - SAVE_STEPS}" in out or plan[-1][1] == SAVE_STEPS, out[-3000:]
    weights = final_weights(run_dir, sft)
    expected = reference(tmp_path_factory, demo, sft)
    assert weights.keys() == expected.keys()
    differ = [k for k in weights if not (weights[k] == expected[k]).all()]
    assert not differ, f"plan {plan}: {len(differ)} tensors differ from the uninterrupted run, e.g. {differ[:3]}"

    rows = [json.loads(line) for line in (run_dir / "logging.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, MAX_STEPS + 1)), f"plan {plan}: logged steps {steps}"
    assert not (run_dir / ".staging").exists()
    assert [p.name for p in run_dir.glob("checkpoint-*")] == [f"checkpoint-{MAX_STEPS}"]  # save_total_limit=1
    if sft == "lora":  # fed by a DataLoader worker: tensors reach the trainer through /dev/shm
        assert sample_pids(run_dir), "no sample-making process was recorded"
    assert_no_shared_memory_left(run_dir, before)


# seed 7: killed while writing checkpoint-4's optimizer state, then inside step 5 (LoRA, one DataLoader worker);
# seed 25: killed inside step 2 (no checkpoint yet), then with checkpoint-6 complete but not yet published (full)
@pytest.mark.parametrize("sft,seed", [("lora", 7), ("full", 25)])
def test_killed_run_resumes_bitwise(tmp_path, tmp_path_factory, demo, sft, seed):
    check_killed_and_resumed(tmp_path, tmp_path_factory, demo, sft, seed)


@pytest.mark.soak
@pytest.mark.parametrize("seed", [0, 5, 9, 24, 36, 48, 100, 101, 105, 109])
@pytest.mark.parametrize("sft", ["lora", "full"])
def test_killed_run_resumes_bitwise_soak(tmp_path, tmp_path_factory, demo, sft, seed):
    check_killed_and_resumed(tmp_path, tmp_path_factory, demo, sft, seed)


@pytest.mark.multiprocess
def test_ddp_killed_run_resumes_bitwise(tmp_path, tmp_path_factory, demo):
    """2-process DDP (gloo on CPU): both ranks killed inside step 3, resumed with `resume=auto`, equal to an
    uninterrupted DDP run; every rank restores its own RNG state and the data order follows from (seed, epoch,
    step)."""
    args = [*overrides(demo, "lora"), "parallel=ddp", "global_batch_size=4"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER, encoding="utf-8")

    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()

    def torchrun(run_dir: Path, extra: list[str], kill: tuple[str, int] | None = None):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(runner), *args,
               f"hydra.run.dir={run_dir}", *extra]
        kill_env = {"KILL_WHERE": kill[0], "KILL_STEP": str(kill[1])} if kill else {}
        kill_env["SAMPLE_PIDS"] = str(run_dir.parent / "sample_pids.txt")
        proc = subprocess.run(cmd, cwd=run_dir.parent, env={**env, **kill_env}, capture_output=True, text=True,
                              timeout=600)
        return proc.returncode, proc.stdout + proc.stderr

    ref_dir = tmp_path / "reference"
    code, out = torchrun(ref_dir, [])
    assert code == 0, out[-3000:]
    run_dir = tmp_path / "run"
    code, out = torchrun(run_dir, [], kill=("step", SAVE_STEPS + 1))  # both ranks die inside step 3
    assert code != 0 and (run_dir / f"checkpoint-{SAVE_STEPS}").is_dir(), out[-3000:]
    assert not (run_dir / f"checkpoint-{2 * SAVE_STEPS}").exists()
    code, out = torchrun(run_dir, ["resume=auto"])
    assert code == 0, out[-3000:]
    got, expected = final_weights(run_dir, "lora"), final_weights(ref_dir, "lora")
    assert all((got[k] == expected[k]).all() for k in expected)
    assert sample_pids(run_dir)
    assert_no_shared_memory_left(run_dir, before)  # both ranks and their workers were SIGKILLed once


def test_resume_from_an_earlier_checkpoint_then_requeue_continues_that_branch(tmp_path, demo):
    """A run with checkpoints 2, 4 and 6 is resumed from checkpoint-2: 4 and 6 (and their logging.jsonl rows) are
    moved to `superseded/`, not deleted. That branch is killed inside step 5; `resume=auto` (what a requeued job
    runs) continues it from its own checkpoint-4, not from the superseded checkpoint-6."""
    args = [a for a in overrides(demo, "lora") if not a.startswith("trainer.save_total_limit")]
    args.append("trainer.save_total_limit=10")
    run_dir = tmp_path / "run"
    code, out = launch(run_dir, args)
    assert code == 0, out[-3000:]
    first = {p.name: (p / "adapter_model.safetensors").read_bytes() for p in run_dir.glob("checkpoint-*")}
    assert sorted(first) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]

    env = {**os.environ, "PYTHONPATH": str(ROOT), "KILL_WHERE": "step", "KILL_STEP": "5"}
    proc = subprocess.run([sys.executable, "-c", RUNNER, f"resume={run_dir / 'checkpoint-2'}"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, (proc.stdout + proc.stderr)[-3000:]
    aside = list((run_dir / "superseded").iterdir())
    assert len(aside) == 1 and aside[0].name.endswith("-after-step-2")
    assert sorted(p.name for p in aside[0].glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert (aside[0] / "checkpoint-6" / "adapter_model.safetensors").read_bytes() == first["checkpoint-6"]
    moved = [json.loads(line)["step"] for line in (aside[0] / "logging.jsonl").read_text().splitlines()]
    assert sorted({s for s in moved}) == [3, 4, 5, 6]
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]  # the new 4

    code, out = launch(run_dir, args, resume=True)
    assert code == 0, out[-3000:]
    assert f"from {run_dir / 'checkpoint-4'}" in out
    rows = [json.loads(line) for line in (run_dir / "logging.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, MAX_STEPS + 1))
    # same data, seed and config: the branch ends where the first run ended, bit for bit
    assert (run_dir / "checkpoint-6" / "adapter_model.safetensors").read_bytes() == first["checkpoint-6"]


def test_resume_auto_never_restarts_silently(tmp_path, demo, caplog):
    """`resume=auto` without any checkpoint starts at step 0 with a warning naming the folder; a folder whose
    checkpoints are all incomplete is refused with each one's reason."""
    import logging

    from vltrain.config import ConfigError
    from vltrain.manifest import find_resume_point

    with caplog.at_level(logging.WARNING, logger="vltrain.manifest"):
        point = find_resume_point("auto", str(tmp_path / "new"))
    assert point.checkpoint is None
    assert any("holds no checkpoint yet" in r.message and str(tmp_path / "new") in r.message for r in caplog.records)
    broken = tmp_path / "broken"
    (broken / "checkpoint-2").mkdir(parents=True)
    (broken / "checkpoint-4").mkdir()
    (broken / "checkpoint-4" / "vltrain_checkpoint.json").write_text('{"files": {"model.safetensors": 10}}')
    (broken / "checkpoint-4" / "model.safetensors").write_bytes(b"short")
    with pytest.raises(ConfigError) as refused:
        find_resume_point("auto", str(broken))
    assert "checkpoint-2: no vltrain_checkpoint.json" in str(refused.value)
    assert "checkpoint-4: model.safetensors has 5 bytes, 10 recorded" in str(refused.value)
