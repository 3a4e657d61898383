"""Processes and their group: every `parallel` choice as one process, the training collectives' timeout, starts of
2-process runs repeated (no hang at start), and a fault on one rank ending every rank with its message."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vltrain.config import compose_config

REPO = Path(__file__).resolve().parent.parent


def run_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**env, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", **extra}


# ---- the training collectives' timeout -------------------------------------------------------------------------


@pytest.fixture
def group_of_one(monkeypatch):
    """A gloo group of this one process (the environment torchrun would give it), left afterwards."""
    import torch.distributed as dist

    from vltrain.train import parallel

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "x")  # recorded, so that what the group's set-up writes is undone
        monkeypatch.delenv(key)
    assert parallel.init_process_group(solo=True)
    yield
    dist.destroy_process_group()
    parallel._WAIT_GROUPS.clear()


def test_ddp_timeout_reaches_the_process_group(group_of_one, tmp_path):
    """The group exists before the config is read (the run folder's name crosses it); `trainer.ddp_timeout` is then
    set on it, and `parallel.wait_minutes` stays the budget of the separate waiting group."""
    from vltrain.train import parallel
    from vltrain.train.recipe import build_training_arguments

    assert parallel.collective_timeout() == datetime.timedelta(minutes=30)  # torch's default for gloo
    cfg = compose_config(["parallel=single", "trainer.ddp_timeout=77", "parallel.wait_minutes=5"],
                         run_dir=str(tmp_path / "run"))
    args = build_training_arguments(cfg, tmp_path / "run", 1)
    parallel.set_collective_timeout(args.ddp_timeout)
    assert parallel.collective_timeout() == datetime.timedelta(seconds=77)
    wait = parallel.wait_group(cfg.parallel.wait_minutes)
    import torch

    assert wait._get_backend(torch.device("cpu")).options._timeout == datetime.timedelta(minutes=5)
    assert parallel.collective_timeout() == datetime.timedelta(seconds=77)


# ---- every parallel choice as one process ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from vltrain.data.demo import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("demo"), n_train=8, n_val=2)


def one_process(tmp_path: Path, demo, *overrides: str) -> subprocess.CompletedProcess:
    tmp_path.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "vltrain", "dataset=custom", f"dataset.train=[{demo.train}]",
           f"dataset.val=[{demo.val}]", "global_batch_size=2", "trainer.max_steps=2", "trainer.save_steps=2",
           "trainer.eval_steps=2", "trainer.logging_steps=1", "eval.generate_samples=2", "eval.max_new_tokens=2",
           "trainer.dataloader_num_workers=0", f"hydra.run.dir={tmp_path / 'run'}", *overrides]
    return subprocess.run(cmd, cwd=tmp_path, env=run_env(), capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["zero2", "zero3", "zero2_offload", "zero3_offload"])
def test_deepspeed_trains_as_one_process(tmp_path, demo, mode):
    """DeepSpeed in one process sets up its own group of one (not DeepSpeed's MPI discovery, which needs
    mpi4py) and trains to a complete checkpoint."""
    out = one_process(tmp_path, demo, f"parallel={mode}")
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "mpi4py" not in text
    assert (tmp_path / "run" / "checkpoint-2" / "vltrain_checkpoint.json").is_file()
    assert (tmp_path / "run" / "deepspeed.json").is_file()
    assert "final metrics" in text


@pytest.mark.slow
def test_single_and_device_map_train_as_one_process(tmp_path, demo):
    out = one_process(tmp_path / "single", demo, "parallel=single")
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert (tmp_path / "single" / "run" / "checkpoint-2").is_dir()
    mapping = tmp_path / "map.json"  # no GPU here: an explicit map (the planner is tested in test_launch.py)
    mapping.write_text('{"": "cpu"}')
    out = one_process(tmp_path / "device_map", demo, "parallel=device_map", f"model.device_map_config={mapping}")
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert (tmp_path / "device_map" / "run" / "checkpoint-2").is_dir()


def test_ddp_as_one_process_is_refused(tmp_path, demo):
    out = one_process(tmp_path, demo, "parallel=ddp")
    assert out.returncode != 0
    assert "parallel=ddp needs several processes" in out.stderr
    assert not (tmp_path / "run").exists()


# ---- starts of a 2-process run ---------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(cmd: list[str], cwd: Path, delay: float = 1.5, timeout: float = 900, **extra_env: str):
    """Both ranks of a 2-process run, started as torchrun starts them (its environment), rank 1 `delay` seconds
    after rank 0; returns [(returncode, output)] per rank, or fails naming what every rank printed when the run
    is not over within `timeout` seconds (both are then killed)."""
    import time

    port = str(free_port())
    procs, logs = [], []
    for rank in (0, 1):
        if rank:
            time.sleep(delay)
        log = (cwd / f"rank{rank}.log").open("w+")
        env = run_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1", **extra_env)
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT))
        logs.append(log)
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.wait()
        texts = [(log.seek(0), log.read())[1][-3000:] for log in logs]
        pytest.fail(f"the run did not end within {timeout} s:\n" + "\n".join(
            f"--- rank {r} ---\n{t}" for r, t in enumerate(texts)))
    out = []
    for p, log in zip(procs, logs):
        log.seek(0)
        out.append((p.returncode, log.read()))
        log.close()
    return out


DDP_START = [sys.executable, "-m", "vltrain", "parallel=ddp", "trainer.max_steps=4", "trainer.save_steps=4",
             "trainer.eval_steps=4", "eval.generate_samples=4"]

STARTS = [pytest.param(i, marks=[pytest.mark.slow, pytest.mark.multiprocess]) for i in range(3)]
STARTS += [pytest.param(i, marks=pytest.mark.soak) for i in range(3, 23)]


@pytest.mark.parametrize("start", STARTS)
def test_ddp_start_from_an_empty_folder_never_hangs(tmp_path, start):
    """The README's DDP command from an empty folder (demo data generated on the way, the default run folder),
    the second rank 1.5 s after the first: it once hung in 1 of 17 starts, a DataLoader worker forked while
    another thread of its rank held a lock. 3 starts here, 20 more with `pytest -m soak`."""
    results = start_ranks(DDP_START, tmp_path)
    for rank, (code, text) in enumerate(results):
        assert code == 0, f"rank {rank}:\n{text[-4000:]}"
    runs = list((tmp_path / "outputs" / "tiny").iterdir())
    assert len(runs) == 1, runs  # one run folder for both ranks
    assert (runs[0] / "final_metrics.json").is_file()
    assert (runs[0] / "checkpoint-4" / "vltrain_checkpoint.json").is_file()


# ---- faults --------------------------------------------------------------------------------------------------

DEEPSPEED_NAN = '''
import json, sys
import torch
from transformers import TrainerCallback
from vltrain.config import compose_config
from vltrain.train.recipe import build_trainer
from vltrain.train.trainer import NumericalFault

policy, train_file, run = sys.argv[1:4]
cfg = compose_config(["parallel=zero2", "sft_type=full", "dataset=custom", f"dataset.train=[{train_file}]",
                      "dataset.val_ratio=0", "global_batch_size=2", "trainer.per_device_train_batch_size=2",
                      "trainer.max_steps=4", "trainer.save_steps=2", "trainer.eval_strategy=no",
                      "trainer.dataloader_num_workers=0", "trainer.activation_checkpointing=false",
                      f"on_nonfinite={policy}"], run_dir=run)
trainer = build_trainer(cfg)
forwards = []

def poison(module, args, output):  # NaN embeddings in the forward pass of optimizer step 3
    forwards.append(1)
    return output * float("nan") if len(forwards) == 3 else output

trainer.model.get_input_embeddings().register_forward_hook(poison)
weights = {}

class Snapshot(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        weights[state.global_step] = [p.detach().clone() for p in trainer.model.parameters()]

trainer.add_callback(Snapshot())
out = {"fault": None}
try:
    trainer.train()
except NumericalFault as e:
    out["fault"] = str(e)
model = trainer.model
out["finite"] = all(bool(torch.isfinite(p).all()) for p in model.parameters())
out["steps"] = sorted(weights)
if 2 in weights and 3 in weights:
    out["step3_unchanged"] = all(torch.equal(a, b) for a, b in zip(weights[2], weights[3]))
out["skipped_steps"] = trainer.model_wrapped.skipped_steps if hasattr(trainer.model_wrapped, "skipped_steps") else None
print("RESULT " + json.dumps(out))
'''


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_deepspeed_nonfinite_step_changes_no_weight(tmp_path, demo, policy):
    """Under DeepSpeed the update is applied inside backward. A NaN loss stops the run before backward
    (`stop`); with `skip`, the NaN gradients are DeepSpeed's overflow: it zeroes them and skips the update (its
    `skipped_steps`), and vltrain logs the skipped step. Either way the weights after the bad step are those
    before it."""
    script = tmp_path / "nan.py"
    script.write_text(DEEPSPEED_NAN)
    out = subprocess.run([sys.executable, str(script), policy, str(demo.train), str(tmp_path / "run")],
                         cwd=tmp_path, env=run_env(), capture_output=True, text=True, timeout=900)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    import json

    result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["finite"]
    if policy == "stop":
        assert "loss is nan at step 3" in result["fault"] and "nothing from this step was applied" in result["fault"]
        assert result["steps"] == [1, 2]
    else:
        assert result["fault"] is None and result["steps"] == [1, 2, 3, 4]
        assert result["step3_unchanged"] and result["skipped_steps"] == 1
        assert "at step 3" in text and "step skipped (on_nonfinite=skip)" in text


RANK1_FAULT = '''
import os, sys
from vltrain.train import trainer as trainer_module

original = trainer_module.VLTrainer.compute_loss

def compute_loss(self, model, inputs, *args, **kwargs):
    if model.training and self.state.global_step == 1 and os.environ["RANK"] == "1":
        raise RuntimeError("injected fault on rank 1")
    return original(self, model, inputs, *args, **kwargs)

trainer_module.VLTrainer.compute_loss = compute_loss
from vltrain.__main__ import entry

if __name__ == "__main__":  # DataLoader workers import this file as __mp_main__ (fork server)
    entry()
'''


def ddp_args(demo) -> list[str]:
    return ["parallel=ddp", "dataset=custom", f"dataset.train=[{demo.train}]", "dataset.val_ratio=0",
            "global_batch_size=2", "trainer.max_steps=4", "trainer.save_steps=4", "trainer.eval_strategy=no",
            "trainer.dataloader_num_workers=0", "trainer.logging_steps=1"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fault_on_one_rank_ends_every_rank_with_its_message(tmp_path, demo):
    """Rank 1 fails in the middle of step 2, before its backward; rank 0 is then waiting in a collective (for up
    to `trainer.ddp_timeout`). Both end within seconds, each naming rank 1's error."""
    import re
    import time

    script = tmp_path / "fault.py"
    script.write_text(RANK1_FAULT)
    start = time.monotonic()
    results = start_ranks([sys.executable, str(script), *ddp_args(demo), f"hydra.run.dir={tmp_path / 'run'}"],
                          tmp_path, delay=0, timeout=600)
    for rank, (code, text) in enumerate(results):
        assert code != 0, f"rank {rank} did not fail:\n{text[-3000:]}"
        assert "injected fault on rank 1" in text, f"rank {rank}:\n{text[-3000:]}"
    assert "vltrain: stopping, rank 1: RuntimeError: injected fault on rank 1" in results[0][1]
    # both ended at once: rank 0's last log line is no later than a few seconds after rank 1's fault
    stamps = [re.findall(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+\]", text, re.M) for _, text in results]
    assert stamps[0] and stamps[1]
    assert time.monotonic() - start < 600


RANK0_DATA_FAULT = '''
import os
from vltrain.train import data

original = data.prepare_data

def prepare_data(cfg, encoder, run_dir, write_skipped=True, verdict=None):
    if os.environ["RANK"] == "0":
        raise OSError("injected: rank 0 could not read the records")
    return original(cfg, encoder, run_dir, write_skipped, verdict)

data.prepare_data = prepare_data
from vltrain.__main__ import entry

if __name__ == "__main__":  # DataLoader workers import this file as __mp_main__ (fork server)
    entry()
'''


@pytest.mark.slow
@pytest.mark.multiprocess
def test_error_on_rank_0_only_ends_the_waiting_ranks(tmp_path, demo):
    """Rank 0's data check fails with an error of its own (not a bad row, whose verdict every rank takes); rank 1
    waits for that verdict for up to `parallel.wait_minutes` (180). It ends at once with rank 0's message."""
    import time

    script = tmp_path / "fault.py"
    script.write_text(RANK0_DATA_FAULT)
    start = time.monotonic()
    results = start_ranks([sys.executable, str(script), *ddp_args(demo), f"hydra.run.dir={tmp_path / 'run'}"],
                          tmp_path, delay=0, timeout=300)
    elapsed = time.monotonic() - start
    assert "injected: rank 0 could not read the records" in results[0][1]
    assert "vltrain: stopping, rank 0: OSError: injected: rank 0 could not read the records" in results[1][1], \
        results[1][1][-3000:]
    assert results[0][0] != 0 and results[1][0] != 0
    assert elapsed < 300
