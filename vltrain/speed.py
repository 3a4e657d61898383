"""The CPU speed tricks, in one place: each is invisible in the results (same samples, same weights) and each was
kept only for what it measured. Numbers: BENCHMARKS.md (`scripts/bench/step.py`, `contention.py`, `data.py`).

- Thread budget (`share_cores`): torch's intra-op threads get the cores this process's DataLoader workers (and
  the other ranks on the node) leave free. With torch's default of one thread per core, the demo beside one busy
  process ran at 0.47x its idle speed (8.5x slower on a machine with load 8-9); with the budget 0.91x
  (`scripts/bench/contention.py`). Data processes run one thread each (`one_thread`): the processes are the
  parallelism. An explicit `OMP_NUM_THREADS` is left alone.
- Allocator that keeps freed memory (`keep_freed_memory`, once per data process): glibc returned each freed
  multi-MB tile buffer to the OS and page-faulted the next one in; normalising 172 tiles in a warm loop went from
  0.47 s to 0.05 s (`scripts/bench/data.py`).
- Tensors handed over by shared-memory name (`ready_data_process`, DataLoader workers only): torch's `file_system`
  strategy instead of a file descriptor per tensor through a socket; the trainer's wait for a demo batch went from
  2.2-2.8 ms to 1.1 ms (`scripts/bench/step.py`).
- Tiles cross from the workers as uint8 and are normalised by the trainer on its device
  (`FastSteps._prepare_inputs`): the trainer's first read of float tiles in fresh shared memory page-faults (4 ms
  for a batch's 4 tiles against 0.3 ms already touched); normalising 4 uint8 tiles takes 1.2 ms.
- No per-step walks of the model (`FastSteps`): the Trainer's `model.train()` at every step (1 ms on the demo's
  model), its FLOP estimate counting every parameter (0.7 ms) and its gradient clipping over every parameter
  (0.95 ms a step, 0.45 ms over the trainable parameters listed once). Together with the two above: the demo's
  step went from 1.25-1.38x to 1.09-1.20x a bare PyTorch loop, the data wait from 5.3-6.0% to 2.2-2.4%; a wider
  model runs at 0.999x (`scripts/bench/step.py`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from contextlib import contextmanager

import torch
from torch.utils.data import get_worker_info

from vltrain.context import process

# ---- threads -------------------------------------------------------------------------------------------------


def share_cores(num_workers: int, local_processes: int | None = None) -> int:
    """Give torch's intra-op threads the cores this process's data workers leave free (at least one) and return
    that number. Several ranks on one machine (`local_processes`, default: the process context's local world
    size) split its cores first.

    torch starts one intra-op thread per core; with data workers (and other ranks) beside them the cores are
    oversubscribed, and OpenMP threads that wait for each other at every op then lose whole time slices to any
    other busy process. An explicit `OMP_NUM_THREADS` is left alone."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ranks = max(1, local_processes or process().local_world_size)
    threads = max(1, cores // ranks - num_workers)
    torch.set_num_threads(threads)
    return threads


def one_thread(_worker_id: int = 0) -> None:
    """A DataLoader `worker_init_fn` for data processes that work in parallel: one torch thread each."""
    torch.set_num_threads(1)


# ---- data processes --------------------------------------------------------------------------------------------

_ALLOCATOR_TUNED: dict[int, bool] = {}


def keep_freed_memory() -> bool:
    """Let this process's C allocator (glibc) keep large freed blocks for reuse: tiles and batches (tens of MB)
    are then carved from memory already mapped instead of mmap'ed, page-faulted and unmapped for every sample.
    Once per process (DataLoader workers call it on their first sample); False where there is no glibc `mallopt`."""
    pid = os.getpid()
    if pid not in _ALLOCATOR_TUNED:
        try:
            mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
        except (OSError, AttributeError):
            _ALLOCATOR_TUNED[pid] = False
        else:
            m_trim_threshold, m_mmap_threshold = -1, -3
            _ALLOCATOR_TUNED[pid] = bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold,
                                                                                                1 << 30))
    return _ALLOCATOR_TUNED[pid]


def ready_data_process() -> None:
    """Set up a process that makes samples, on its first sample: `keep_freed_memory`, and in a DataLoader worker,
    torch's `file_system` sharing strategy (tensors passed by shared-memory name; segments are still
    reference-counted and cleaned up by torch's shared-memory manager)."""
    keep_freed_memory()
    if get_worker_info() is not None and torch.multiprocessing.get_sharing_strategy() != "file_system":
        torch.multiprocessing.set_sharing_strategy("file_system")


# ---- the training step -----------------------------------------------------------------------------------------


class FastSteps:
    """Mixed into the HF Trainer (before it): the per-step walks of the whole model done once, and tiles normalised
    on the trainer's device. DeepSpeed and FSDP keep the Trainer's own code where they differ."""

    _trainable: list[torch.nn.Parameter] | None = None
    _parameters_counted: int | None = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        with self._training_mode_kept(model):
            return super().training_step(model, inputs, num_items_in_batch)

    @contextmanager
    def _training_mode_kept(self, model):
        """The Trainer calls `model.train()` at every step, which walks every module. Skipped while the model is
        still in training mode from the last step: evaluation and generation switch the whole model (its root), so
        a root in training mode means every module is. Not under DeepSpeed, whose engine keeps no mode of its own."""
        if self.is_deepspeed_enabled or not (model.training and self.accelerator.unwrap_model(model).training):
            yield
            return
        model.train = lambda mode=True: model  # shadows nn.Module.train on this instance for the step
        try:
            yield
        finally:
            del model.train

    def _clip_grad_norm(self, model):
        """The Trainer's clipping, over the trainable parameters listed once (it walks every parameter of the model
        at every step, twice)."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._clip_grad_norm(model)
        if self._trainable is None:
            self._trainable = [p for p in model.parameters() if p.requires_grad]
        return self.accelerator.clip_grad_norm_(self._trainable, self.args.max_grad_norm)

    def floating_point_ops(self, inputs) -> int:
        """The Trainer's estimate, 6 x input tokens x parameters without embeddings, with the parameters counted
        once: counting walks every module, and the Trainer asks at every step."""
        if self._parameters_counted is None:
            count = getattr(self.model, "num_parameters", None)
            self._parameters_counted = count(exclude_embeddings=True) if count else 0
        ids = inputs.get(getattr(self.model, "main_input_name", "input_ids"))
        return 6 * ids.numel() * self._parameters_counted if ids is not None else 0

    def _prepare_inputs(self, inputs):
        """Tiles come from the DataLoader workers as uint8 (the collator's `normalise_tiles=False`) and are
        normalised here, on the device: on a GPU after the 4x smaller copy; on the CPU into this process's own
        memory, which costs less than touching float tiles in the workers' shared memory for the first time."""
        from vltrain.data.tiling import normalise_tensor

        inputs = super()._prepare_inputs(inputs)
        pixels = inputs.get("pixel_values")
        if pixels is not None and pixels.dtype == torch.uint8:
            inputs["pixel_values"] = normalise_tensor(pixels)
        return inputs
