"""Training callbacks of multi-process and cluster runs: the run's shape in `logging.jsonl`, and a checkpoint on
preemption.

- `RunShape`: a row of `logging.jsonl` at each start and resume holds the world size and the global batch as the
  processes see it (per-device batch x gradient accumulation x world size).
- `PreemptionCheckpoint`: on SIGTERM or SIGUSR1 (what SLURM sends before it preempts or ends a job) every rank
  finishes its step, a checkpoint is saved, training stops, and the run folder gets a `PREEMPTED` file; the job
  is then requeued with `resume=auto` (conf/hydra/launcher/slurm.yaml) and continues from that checkpoint.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path

from transformers import TrainerCallback

from vltrain.manifest import LOG_FILE

log = logging.getLogger(__name__)

PREEMPTED = "PREEMPTED"
"""Written into the run folder when training stopped on a preemption signal (removed by a finished run)."""

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class RunShape(TrainerCallback):
    """Writes the run's shape as a row of `<run>/logging.jsonl` when training starts or resumes (rank 0)."""

    def __init__(self, world_size: int, requested_global_batch: int):
        self.world_size = world_size
        self.requested = requested_global_batch

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        row = {"step": state.global_step, "world_size": args.world_size,
               "per_device_train_batch_size": args.per_device_train_batch_size,
               "gradient_accumulation_steps": args.gradient_accumulation_steps,
               "global_batch": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
               "requested_global_batch": self.requested, "launched_processes": self.world_size,
               "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        path = Path(args.output_dir) / LOG_FILE
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


class PreemptionCheckpoint(TrainerCallback):
    """SIGTERM / SIGUSR1 -> save a checkpoint at the end of the current step and stop. Ranks agree on the stop
    (a signal may reach them at different steps), so they save the same step together, as ZeRO requires."""

    def __init__(self):
        self.signalled = False
        self.preempted = False
        self._previous = {}

    def _handler(self, signum, frame):
        log.warning("signal %s: saving a checkpoint at the end of this step, then stopping", signum)
        self.signalled = True

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in PREEMPTION_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. a notebook's worker thread): nothing to install
                pass

    def on_step_end(self, args, state, control, **kwargs):
        if self._agreed(args.world_size):
            self.preempted = True
            control.should_save = True
            control.should_training_stop = True
            if state.is_world_process_zero:
                (Path(args.output_dir) / PREEMPTED).write_text(f"step {state.global_step}\n", encoding="utf-8")
        return control

    def on_train_end(self, args, state, control, **kwargs):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        marker = Path(args.output_dir) / PREEMPTED
        if not self.preempted and state.is_world_process_zero and marker.is_file():
            marker.unlink()  # a resumed run that finished

    def _agreed(self, world_size: int) -> bool:
        if world_size <= 1:
            return self.signalled
        import torch
        import torch.distributed as dist

        from vltrain.train.parallel import wait_group

        flag = torch.tensor([1 if self.signalled else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=wait_group(30.0))
        return bool(flag.item())
