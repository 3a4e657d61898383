"""Training entry point: compose the Hydra config, validate it into a TrainConfig, call `train(cfg)`.

Run as:
    python -m vltrain                                     # tiny random InternVL on the demo data
    python -m vltrain model=internvl2-8b dataset=custom dataset.train=[data.jsonl] sft_type=lora
    python -m vltrain -m sft_type=lora,full               # Hydra multirun: one run folder per job, a summary table
    torchrun --nproc_per_node 2 -m vltrain parallel=zero2 # one process per device
    NPROC_PER_NODE=2 python -m vltrain parallel=zero2     # the same: starts torchrun (ms-swift's spelling;
                                                          #   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT too)
    deepspeed --num_gpus 2 --module vltrain parallel=zero3
    python -m vltrain -m ... hydra/launcher=slurm         # each point a SLURM job (torchrun inside)

Several processes share one run folder, named once by rank 0; only rank 0 writes Hydra's `.hydra/` and job log.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from vltrain.cli import (
    add_or_override,
    check_overrides,
    discard_unused_run_dir,
    resume_config,
    settle_run_dir,
    to_train_config,
)
from vltrain.config import ConfigError

log = logging.getLogger("vltrain")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> dict | None:
    run_dir = cfg.run_dir
    is_main = int(os.environ.get("RANK", "0")) == 0  # only the main process writes (and removes) the run folder
    try:
        train_cfg, _ = to_train_config(cfg)
        if train_cfg.resume:  # the saved config, with the keys given on the command line
            train_cfg = resume_config(cfg, HydraConfig.get().overrides.task)
    except ConfigError as e:  # raised inside Hydra's job: exit here, or Hydra wraps it in a traceback
        if is_main:
            discard_unused_run_dir(run_dir)
        sys.exit(f"vltrain: config error: {e}")
    from vltrain.sweep import FINAL_METRICS, slurm_torchrun_command, write_final_metrics

    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "LOCAL_RANK" not in os.environ:
        # A SLURM job (one task per node): training runs in the processes torchrun starts on every node.
        cmd = slurm_torchrun_command([*HydraConfig.get().overrides.task, f"hydra.run.dir={train_cfg.run_dir}"])
        if cmd is not None:
            from vltrain.sweep import run_child

            code = run_child(cmd)
            if code != 0:
                sys.exit(f"vltrain: training processes exited with status {code}")
            import json
            from pathlib import Path

            return json.loads((Path(train_cfg.run_dir) / FINAL_METRICS).read_text(encoding="utf-8"))
    from vltrain.train.checkpoint import CheckpointError
    from vltrain.train.recipe import train  # heavy imports only once the config is known to be valid
    from vltrain.train.trainer import NumericalFault

    if int(os.environ.get("RANK", "0")) == 0:
        print(OmegaConf.to_yaml(cfg, resolve=True))
    try:
        metrics = train(train_cfg)
    except (ConfigError, CheckpointError, NumericalFault) as e:  # bad rows, a full disk, a NaN: one message
        if is_main:
            discard_unused_run_dir(run_dir)
        sys.exit(f"vltrain: {e}")
    except BaseException:
        if is_main:
            discard_unused_run_dir(run_dir)
        raise
    log.info("final metrics: %s", metrics)
    if int(os.environ.get("RANK", "0")) == 0:
        write_final_metrics(train_cfg.run_dir, metrics)
    return metrics


def strip_local_rank(argv: list[str]) -> list[str]:
    """Drop the `--local_rank=N` / `--local_rank N` the `deepspeed` launcher passes (Hydra's parser rejects it);
    the rank is in LOCAL_RANK."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
            continue
        if arg in ("--local_rank", "--local-rank"):
            if i + 1 < len(argv):
                os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
            continue
        out.append(arg)
    return out


def launch_request() -> list[str] | None:
    """ms-swift's spelling `NPROC_PER_NODE=N [NNODES= NODE_RANK= MASTER_ADDR= MASTER_PORT=] python -m vltrain`:
    the torchrun command to run instead (None when not asked, or already inside torchrun's processes)."""
    nproc = os.environ.get("NPROC_PER_NODE")
    if "LOCAL_RANK" in os.environ:
        return None
    if not nproc:
        if int(os.environ.get("NNODES", "1") or 1) > 1:
            raise ConfigError(f"NNODES={os.environ['NNODES']} without NPROC_PER_NODE: set NPROC_PER_NODE=<GPUs per "
                              "node> too (or launch with torchrun)")
        return None
    from vltrain.sweep import torchrun_command

    try:
        return torchrun_command(int(nproc), sys.argv[1:], nnodes=int(os.environ.get("NNODES", "1")),
                                node_rank=int(os.environ.get("NODE_RANK", "0")),
                                master_addr=os.environ.get("MASTER_ADDR"),
                                master_port=int(os.environ["MASTER_PORT"]) if "MASTER_PORT" in os.environ else None)
    except ValueError as e:
        raise ConfigError(f"NPROC_PER_NODE={nproc}: {e}") from None


def distributed_overrides(argv: list[str]) -> list[str]:
    """Overrides every process of a multi-process run adds: the run (or sweep) folder named once, from rank 0's
    clock (each process resolving `${now:}` itself would make one folder per second boundary crossed), and on
    ranks other than 0 no `.hydra/` folder and no job log file (rank 0 writes those)."""
    from vltrain.train.run import shared_stamp

    stamp = shared_stamp()
    keys = {a.split("=", 1)[0].lstrip("+") for a in argv if "=" in a}
    extra = []
    if "hydra.run.dir" not in keys:
        extra.append(f"hydra.run.dir=outputs/${{model.name}}/{stamp}")
    if "hydra.sweep.dir" not in keys:
        extra.append(f"hydra.sweep.dir=outputs/multirun/{stamp}")
    if int(os.environ.get("RANK", "0")) != 0:
        extra += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    return extra


def entry() -> None:
    try:
        sys.argv = sys.argv[:1] + strip_local_rank(sys.argv[1:])
        torchrun = launch_request()
        if torchrun is not None:
            print("vltrain: " + " ".join(torchrun), flush=True)
            os.execv(torchrun[0], torchrun)
        check_overrides(sys.argv[1:])
        argv = settle_run_dir(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"vltrain: config error: {e}")
    argv = add_or_override(argv)
    if "-m" in argv or "--multirun" in argv:
        argv.append("++hydra.callbacks.sweep_summary._target_=vltrain.sweep.SweepSummary")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        argv += distributed_overrides(argv)
    sys.argv = sys.argv[:1] + argv
    if not distributed:
        main()
        return
    from vltrain.train.parallel import clean_exit

    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (print(e.code, file=sys.stderr) or 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    clean_exit(code)


if __name__ == "__main__":
    entry()
