"""What each `parallel` choice turns into: TrainingArguments keys, a DeepSpeed config, a device map; and how ranks
wait for each other.

- `training_arguments(cfg, run, world_size)`: the TrainingArguments keys of the mode (`deepspeed=<dict>` for the
  zero* modes, written into the run folder as `deepspeed.json`).
- `plan_device_map(model, max_memory)`: the module -> device map of `parallel=device_map`.
- `rank0_first(...)`: rank 0 (or each node's local rank 0) does a one-off job first, the others wait for it on
  a gloo group of their own whose timeout is `parallel.wait_minutes`, not the training collectives' timeout.
- `cpu_deepspeed_shim()`: the one place that lets DeepSpeed run through accelerate on a machine without CUDA.
- `data_worker_start(...)`: DataLoader workers start from a fork server, never from a training process.
- `report_fault(...)` / `watch_for_faults()`: a rank that fails ends every other rank at once, with its message.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from vltrain.config import ConfigError, ModelConfig, TrainConfig
from vltrain.context import process

log = logging.getLogger(__name__)

DEEPSPEED_FILE = "deepspeed.json"
"""The DeepSpeed config of a zero* run, as given (`auto` values unfilled), in the run folder."""


# ---- DeepSpeed ---------------------------------------------------------------------------------------------------


def uses_deepspeed(cfg: TrainConfig) -> bool:
    return cfg.parallel.name.startswith("zero")


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any] | None:
    """The DeepSpeed config of the run: the YAML mapping, or the user's JSON file (`parallel.deepspeed=path`)."""
    spec = cfg.parallel.deepspeed
    if not uses_deepspeed(cfg):
        return None
    if isinstance(spec, dict):
        return json.loads(json.dumps(spec))  # a deep copy: the Trainer fills `auto` values in place
    path, config = read_json_file(spec, "parallel.deepspeed")
    if not isinstance(config, dict) or "zero_optimization" not in config:
        raise ConfigError(f"{path}: a DeepSpeed config needs a zero_optimization section")
    return config


def read_json_file(spec: str, key: str) -> tuple[Path, Any]:
    """(path, parsed contents) of the JSON file config key `key` names; a missing file or bad JSON is one
    ConfigError naming the key, or the file and line."""
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}={spec}: no such file")
    try:
        return path, json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def check_launch(cfg: TrainConfig, processes: int) -> None:
    """A multi-process mode started as one process is an error (DDP of one process does nothing), never ignored;
    DeepSpeed on one process is allowed (ZeRO offload, or testing a config) with a warning."""
    if cfg.parallel.name == "ddp" and processes == 1:
        raise ConfigError("parallel=ddp needs several processes, but this is one: start it with "
                          "`NPROC_PER_NODE=<gpus> python -m vltrain ...` or `torchrun --nproc_per_node <gpus> -m "
                          "vltrain ...` (or use parallel=single)")
    if cfg.parallel.name == "device_map" and processes > 1:
        raise ConfigError(f"parallel=device_map runs as one process that spreads the model over the GPUs; it was "
                          f"started as {processes} processes (drop torchrun / NPROC_PER_NODE, or use parallel=ddp, "
                          "zero2 or zero3)")
    if cfg.parallel.name == "device_map" and not torch.cuda.is_available() and cfg.model.device_map_config is None:
        raise ConfigError("parallel=device_map spreads the model over GPUs and none is visible (use parallel=single "
                          "on CPU, or give model.device_map_config)")
    if cfg.parallel.name == "single" and processes > 1:
        raise ConfigError(f"parallel=single, but {processes} processes were started: choose parallel=ddp, zero2 "
                          "or zero3 for several processes")
    if uses_deepspeed(cfg) and processes == 1:
        log.warning("parallel=%s with a single process: nothing is partitioned across processes (start several "
                    "with NPROC_PER_NODE=<gpus> or torchrun)", cfg.parallel.name)


def training_arguments(cfg: TrainConfig, run_dir: Path, write: bool) -> dict[str, Any]:
    """TrainingArguments keys of `cfg.parallel`. The DeepSpeed config is written to `<run>/deepspeed.json` when
    `write` (rank 0)."""
    kwargs: dict[str, Any] = {}
    config = deepspeed_config(cfg)
    if config is not None:
        if write:
            from vltrain.files import write_atomic

            write_atomic(run_dir / DEEPSPEED_FILE, json.dumps(config, indent=2) + "\n")
        kwargs["deepspeed"] = config
        if not torch.cuda.is_available():
            cpu_deepspeed_shim()
    elif cfg.parallel.name == "ddp" and not torch.cuda.is_available():
        kwargs["ddp_backend"] = "gloo"
    return kwargs


_SHIM_INSTALLED = False


def cpu_deepspeed_shim() -> None:
    """DeepSpeed through accelerate on a machine WITHOUT CUDA (tests, CPU boxes): accelerate picks no process
    group backend when there is no GPU, records one process, and the Trainer's `auto` batch sizes then disagree
    with DeepSpeed's world (`train_batch_size is not equal to micro_batch_per_gpu * ...`). This makes it choose
    gloo for the process group (of one process too). Inactive where CUDA is available: it is never installed there."""
    global _SHIM_INSTALLED
    if _SHIM_INSTALLED or torch.cuda.is_available():
        return
    import accelerate.state as accelerate_state
    from accelerate.utils import DistributedType

    original = accelerate_state.PartialState._prepare_backend

    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        chosen, kind = original(self, cpu, sagemaker_dp, backend)
        if chosen is None and (process().distributed or torch.distributed.is_initialized()):
            return "gloo", DistributedType.MULTI_CPU
        return chosen, kind

    accelerate_state.PartialState._prepare_backend = prepare_backend
    _SHIM_INSTALLED = True


# ---- data workers ------------------------------------------------------------------------------------------------

WORKER_PRELOAD = ["vltrain.train.fork_server", "__main__", "torch", "transformers.trainer_utils", "vltrain.train.order",
                  "vltrain.data.collator", "vltrain.data.dataset"]
"""Imported once by the fork server, so that each worker it forks starts with them (what unpickling a worker's
dataset, collator and seeding function needs; `__main__`: a script's main module, not run again per worker;
`fork_server`: the server ends with the training process, even a killed one)."""


def data_worker_start(num_workers: int) -> str | None:
    """How DataLoader workers start: forked from a fork server, a clean single-threaded process that imported
    `WORKER_PRELOAD` once, rather than from the training process. By the time workers start, a training process
    runs other threads (gloo's loops, OpenMP's pool, Arrow's allocator thread, progress-bar monitors, queue
    feeders); a worker forked from it inherits any lock such a thread held at that instant, held forever, and
    hangs in `os.fork()` (and its rank with it, in the next collective). None: no workers."""
    import multiprocessing

    if num_workers <= 0:
        return None
    multiprocessing.set_forkserver_preload(WORKER_PRELOAD)
    return "forkserver"


# ---- process group and waiting for rank 0 ------------------------------------------------------------------------


def init_process_group(solo: bool = False) -> bool:
    """Join the job's process group (torchrun's environment) if there is one; True when a group exists now.
    NCCL on GPUs (each process on its LOCAL_RANK device), gloo on CPU: what accelerate would choose, so the
    Trainer and DeepSpeed reuse this group. `solo`: a run of one process gets a group of its own (DeepSpeed
    needs one; without it, it looks for an MPI launcher and fails on `import mpi4py`)."""
    import torch.distributed as dist

    if not process().distributed and not solo:
        return dist.is_available() and dist.is_initialized()
    if not dist.is_initialized():
        if not process().distributed:
            one_process_environment()
        if torch.cuda.is_available():
            torch.cuda.set_device(process().local_rank)
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if process().distributed:
        watch_for_faults()
    return True


def one_process_environment() -> None:
    """The variables torchrun would set, for a world of this one process (a free local port for its store);
    what is already set is kept."""
    import socket

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def set_collective_timeout(seconds: float) -> None:
    """`trainer.ddp_timeout` on the training collectives' group. The group is joined before the config is read
    (the run folder's name is shared through it), so the Trainer's own setting of it would come too late and
    torch's default (30 minutes for gloo, 10 for NCCL) would stay. One-off waits use `wait_group` instead."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _set_pg_timeout

    if dist.is_available() and dist.is_initialized():
        _set_pg_timeout(datetime.timedelta(seconds=seconds))


def collective_timeout() -> datetime.timedelta | None:
    """The training collectives' timeout as the group holds it (None without a group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    backend = dist.group.WORLD._get_backend(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return backend.options._timeout


_WAIT_GROUPS: dict[float, Any] = {}


def wait_group(minutes: float):
    """A gloo group over every rank, for waiting only, with its own (long) timeout."""
    import torch.distributed as dist

    if minutes not in _WAIT_GROUPS:
        _WAIT_GROUPS[minutes] = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=minutes))
    return _WAIT_GROUPS[minutes]


def wait_for_all(minutes: float = 180.0) -> None:
    """A barrier across all ranks that tolerates `minutes` of waiting (a no-op without a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier(group=wait_group(minutes))


@contextlib.contextmanager
def rank0_first(minutes: float = 180.0, local: bool = False) -> Iterator[bool]:
    """Run the block on rank 0 (`local`: on each node's local rank 0) first, then on the others. Yields whether
    this process goes first. The waiting ranks wait up to `minutes`."""
    first = process().is_local_main if local else process().is_main
    if not first:
        wait_for_all(minutes)
    try:
        yield first
    finally:
        if first:
            wait_for_all(minutes)


def broadcast_from_rank0(value: Any, minutes: float = 180.0) -> Any:
    """Rank 0's `value` on every rank (pickled through the waiting group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, group=wait_group(minutes))
    return box[0]


def gather_to_all(value: Any, minutes: float = 180.0) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value, group=wait_group(minutes))
    return out


def end_process_group() -> None:
    """Leave the process group, if any (a one-process run: no other rank to wait for)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---- a fault on one rank ends every rank --------------------------------------------------------------------------

FAULT_KEY = "vltrain/fault"
"""Key of the job's store that a failing rank sets to its message; every other rank watches it."""
_FAULT_SEEN = "vltrain/fault_seen"
_WATCHING = False


def _store():
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


def report_fault(message: str) -> None:
    """Tell every rank that this one failed, with its message, and wait until the others have read it or a few
    seconds passed (rank 0 may host the store, which ends with its process). The first report wins: a rank whose
    collective broke because another rank had already failed names that rank's fault, not its own symptom."""
    import sys
    import time

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    try:
        store = _store()
        mine = f"rank {dist.get_rank()}: {message.removeprefix('vltrain: ')}"
        first = store.compare_set(FAULT_KEY, "", mine).decode("utf-8", "replace")
        if first != mine:
            sys.stderr.write(f"vltrain: stopping, {first}\n")
            return
        others, deadline = dist.get_world_size() - 1, time.monotonic() + 5
        while store.add(_FAULT_SEEN, 0) < others and time.monotonic() < deadline:
            time.sleep(0.1)
    except Exception:  # noqa: BLE001 - the store may be gone with its host: the launcher ends the others
        pass


def watch_for_faults(interval: float = 0.2) -> None:
    """A daemon thread that ends this process, with the failing rank's message, as soon as another rank reports a
    fault (`report_fault`): a rank blocked in a collective would otherwise wait for the collective timeout, and
    one waiting for rank 0's one-off work for `parallel.wait_minutes`. It stops quietly when the store goes (the
    job ends)."""
    import threading
    import time

    global _WATCHING
    if _WATCHING:
        return
    _WATCHING = True
    store = _store()

    def watch():
        import sys

        try:
            while not store.check([FAULT_KEY]):
                time.sleep(interval)
            message = store.get(FAULT_KEY).decode("utf-8", "replace")
            store.add(_FAULT_SEEN, 1)
        except Exception:  # noqa: BLE001 - the store ended with the job
            return
        if message.startswith(f"rank {process().rank}:"):
            return  # this process's own report: it is already ending
        sys.stderr.write(f"vltrain: stopping, {message}\n")
        sys.stderr.flush()
        os._exit(1)

    threading.Thread(target=watch, name="vltrain-fault-watch", daemon=True).start()


def clean_exit(code: int = 0) -> None:
    """End a multi-process job without gloo's abort at shutdown (`terminate called without an active exception`
    in about a third of runs): barrier, destroy the group, flush, and leave without interpreter teardown."""
    import sys

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if code == 0:  # after a failure the other ranks may never arrive
            with contextlib.suppress(Exception):
                dist.barrier()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


# ---- device map --------------------------------------------------------------------------------------------------


def parse_size(value: str | int) -> int:
    from accelerate.utils import convert_file_size_to_int

    try:
        return convert_file_size_to_int(value)
    except ValueError:
        raise ConfigError(f"model.device_max_memory: '{value}' is not a size (e.g. 15GB, 15GiB, 800MB)") from None


def max_memory_of(cfg: ModelConfig) -> dict[int, int]:
    """`model.device_max_memory` as {gpu index: bytes}; empty: 90% of every visible GPU."""
    if cfg.device_max_memory:
        if torch.cuda.is_available() and len(cfg.device_max_memory) > torch.cuda.device_count():
            raise ConfigError(f"model.device_max_memory has {len(cfg.device_max_memory)} values but "
                              f"{torch.cuda.device_count()} GPU(s) are visible")
        return {i: parse_size(v) for i, v in enumerate(cfg.device_max_memory)}
    if not torch.cuda.is_available():
        raise ConfigError("parallel=device_map needs GPUs and none is visible (or give model.device_map_config)")
    return {i: int(torch.cuda.mem_get_info(i)[0] * 0.9) for i in range(torch.cuda.device_count())}


def device_map_config(cfg: ModelConfig) -> dict[str, Any] | None:
    """`model.device_map_config` as a mapping (read from its JSON file when a path)."""
    spec = cfg.device_map_config
    if spec is None or isinstance(spec, dict):
        return spec
    path, mapping = read_json_file(spec, "model.device_map_config")
    if not isinstance(mapping, dict):
        raise ConfigError(f"{path}: a device map is a JSON object of module name -> device")
    return mapping


def placement_units(model: torch.nn.Module) -> list[list[str]]:
    """The model's modules in forward order, grouped into units that share a device: [vision tower, projector,
    embeddings, first decoder layer], then each decoder layer, then [final norm, rotary embedding, LM head].
    Units are whole layers, so no vision or decoder layer is ever split."""
    names = {n for n, _ in model.named_children()}
    inner = model.model if "model" in names else model
    prefix = "model." if "model" in names else ""
    language = inner.language_model
    layers = [f"{prefix}language_model.layers.{i}" for i in range(len(language.layers))]
    first = [f"{prefix}vision_tower", f"{prefix}multi_modal_projector", f"{prefix}language_model.embed_tokens",
             layers[0]]
    tail = [f"{prefix}language_model.{n}" for n, _ in language.named_children() if n not in ("layers", "embed_tokens")]
    tail += [n for n, _ in model.named_children() if n != "model"]  # lm_head
    return [first, *[[layer] for layer in layers[1:]], tail]


def plan_device_map(model: torch.nn.Module, max_memory: dict[int, int]) -> dict[str, int]:
    """Fill the devices in order with the placement units (sizes as the model holds them, e.g. on `meta`): the
    vision side and embeddings go where the first decoder layers are, the LM head where the last ones are.
    ConfigError when the model does not fit."""
    from accelerate.utils import compute_module_sizes

    sizes = compute_module_sizes(model)
    devices = sorted(max_memory)
    device_map: dict[str, int] = {}
    d, used = 0, 0
    for unit in placement_units(model):
        need = sum(sizes.get(name, 0) for name in unit)
        while d < len(devices) and used + need > max_memory[devices[d]] and used > 0:
            d, used = d + 1, 0
        if d >= len(devices) or need > max_memory[devices[d]]:
            total = sizes[""] / 2**30
            budget = sum(max_memory.values()) / 2**30
            raise ConfigError(f"model.device_max_memory: the model ({total:.1f} GiB of weights) does not fit in "
                              f"{budget:.1f} GiB over {len(devices)} device(s) (`{unit[0]}` needs "
                              f"{need / 2**30:.2f} GiB); raise the values or add GPUs")
        for name in unit:
            device_map[name] = devices[d]
        used += need
    return device_map


def device_map_for(cfg: ModelConfig, model_on_meta: torch.nn.Module) -> dict[str, Any]:
    """The device map of `parallel=device_map`: `model.device_map_config` when given, else planned from
    `model.device_max_memory` (or the free memory of every visible GPU)."""
    explicit = device_map_config(cfg)
    if explicit is not None:
        return explicit
    return plan_device_map(model_on_meta, max_memory_of(cfg))
