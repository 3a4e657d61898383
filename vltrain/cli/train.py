"""vltrain train: compose the Hydra config, resolve it into a TrainConfig, call `train(cfg)`.

Run as:
    vltrain train                                         # tiny random InternVL on the demo data (also: vltrain,
                                                          #   python -m vltrain)
    vltrain train model=internvl2-8b dataset=custom dataset.train=[data.jsonl] sft_type=lora
    vltrain train -m sft_type=lora,full                   # Hydra multirun: one run folder per job, a summary table
    torchrun --nproc_per_node 2 -m vltrain parallel=zero2 # one process per device
    NPROC_PER_NODE=2 vltrain train parallel=zero2         # the same: starts torchrun (ms-swift's spelling;
                                                          #   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT too)
    deepspeed --num_gpus 2 --module vltrain parallel=zero3
    vltrain train -m ... hydra/launcher=slurm             # each point a SLURM job (torchrun inside)
    vltrain train ... resume=auto                         # continue the newest complete checkpoint of the folder

Keys: vltrain/conf/train.yaml and its groups (model, dataset, sft_type, parallel, logger); any key of
vltrain.config.TrainConfig and any transformers TrainingArguments field as `trainer.<field>`. Several processes
share one run folder, named once by rank 0; only rank 0 writes Hydra's `.hydra/` and job log.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from vltrain.config import ConfigError, add_or_override, check_overrides, group_options, resolve_config
from vltrain.context import process

log = logging.getLogger("vltrain")
_FAILURE: list[str] = []  # what ended the run, when Hydra turns it into a bare exit status


@hydra.main(version_base="1.3", config_path="pkg://vltrain.conf", config_name="train")
def hydra_job(cfg: DictConfig) -> dict | None:
    """One training job of Hydra (one point of a sweep): resolve the config, train, write the final metrics."""
    is_main = process().is_main  # only the main process writes (and removes) the run folder
    try:
        train_cfg, _ = resolve_config(cfg, HydraConfig.get().overrides.task)
    except ConfigError as e:  # raised inside Hydra's job: exit here, or Hydra wraps it in a traceback
        if is_main:
            discard_unused_run_dir(cfg.run_dir)
        sys.exit(f"vltrain: config error: {e}")
    from vltrain.sweep import train_on_slurm_nodes

    metrics = train_on_slurm_nodes(HydraConfig.get().overrides.task, train_cfg.run_dir)
    if metrics is not None:  # a SLURM job: training ran in the torchrun processes it started on every node
        return metrics
    from vltrain.train.checkpoint import CheckpointError
    from vltrain.train.recipe import train  # heavy imports only once the config is known to be valid
    from vltrain.train.trainer import NumericalFault

    if is_main:
        print(OmegaConf.to_yaml(cfg, resolve=True))
    try:
        metrics = train(train_cfg)
    except (ConfigError, CheckpointError, NumericalFault) as e:  # bad rows, a full disk, a NaN: one message
        if is_main:
            discard_unused_run_dir(train_cfg.run_dir)
        sys.exit(f"vltrain: {e}")
    except BaseException as e:
        _FAILURE.append(f"{type(e).__name__}: {e}")  # Hydra prints it and exits 1; the other ranks are told this
        if is_main:
            discard_unused_run_dir(train_cfg.run_dir)
        raise
    log.info("final metrics: %s", metrics)
    if is_main:
        from vltrain.sweep import write_final_metrics

        write_final_metrics(train_cfg.run_dir, metrics)
    return metrics


def discard_unused_run_dir(run_dir: str | Path) -> None:
    """After a failed start: remove the run folder when it holds only what Hydra wrote (`.hydra/`, the log)."""
    folder = Path(run_dir)
    if folder.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in folder.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)


def settle_run_dir(argv: list[str]) -> list[str]:
    """The one run folder of a training run, decided before Hydra creates it (Hydra writes `.hydra/` and the
    log there): `run_dir=X` becomes `hydra.run.dir=X`; `resume=<run folder or checkpoint>` continues in that run's
    folder; a new run refuses a folder that already holds a run. Hydra's config of a resumed job goes to
    `.hydra/resume-<time>/`, next to the original's."""
    from vltrain.manifest import checkpoint_step, refuse_existing_run

    values = {a.split("=", 1)[0].lstrip("+"): a.split("=", 1)[1] for a in argv if "=" in a and not a.startswith("-")}
    multirun = "-m" in argv or "--multirun" in argv
    run_dir, hydra_dir, resume = values.get("run_dir"), values.get("hydra.run.dir"), values.get("resume")
    resume = None if resume in (None, "null", "") else resume
    if multirun and (run_dir or resume):
        raise ConfigError(f"{'run_dir' if run_dir else 'resume'}: not with -m, where every job has its own folder "
                          "(hydra.sweep.dir); run the job alone")
    if run_dir and hydra_dir and Path(run_dir).resolve() != Path(hydra_dir).resolve():
        raise ConfigError(f"run_dir={run_dir} and hydra.run.dir={hydra_dir} disagree; give one of them")
    out = [a for a in argv if not a.lstrip("+").startswith("run_dir=")]
    folder = run_dir or hydra_dir
    if resume and resume != "auto":
        target = Path(resume).expanduser().resolve()
        target = target.parent if checkpoint_step(target) is not None else target
        if folder and Path(folder).resolve() != target:
            raise ConfigError(f"resume={resume} continues {target} in its own folder; drop run_dir / hydra.run.dir")
        folder = str(target)
    if run_dir or (resume and resume != "auto"):
        out = [a for a in out if not a.startswith("hydra.run.dir=")] + [f"hydra.run.dir={folder}"]
    if folder and not multirun:
        if resume and (Path(folder) / ".hydra").is_dir():
            out.append(f"hydra.output_subdir=.hydra/resume-{time.strftime('%Y%m%d-%H%M%S')}")
        elif not resume:
            refuse_existing_run(Path(folder))  # before Hydra writes its `.hydra/` into that run
    return out


def launch_request(argv: list[str]) -> list[str] | None:
    """ms-swift's spelling `NPROC_PER_NODE=N [NNODES= NODE_RANK= MASTER_ADDR= MASTER_PORT=] vltrain train ...`:
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
        return torchrun_command(int(nproc), argv, nnodes=int(os.environ.get("NNODES", "1")),
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
    if not process().is_main:
        extra += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    return extra


def help_text() -> str:
    groups = "\n".join(f"  {g}: {', '.join(group_options(g))}" for g in ("model", "dataset", "sft_type", "parallel",
                                                                          "logger"))
    return f"{__doc__}\nConfig groups (vltrain/conf/<group>/<option>.yaml):\n{groups}"


def main(argv: list[str]) -> int:
    """`vltrain train <overrides>`: start torchrun when asked, settle the run folder, run the Hydra job."""
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return 0
    try:
        torchrun = launch_request(argv)
        if torchrun is not None:
            print("vltrain: " + " ".join(torchrun), flush=True)
            os.execv(torchrun[0], torchrun)
        check_overrides(argv)
        argv = settle_run_dir(argv)
    except ConfigError as e:
        sys.exit(f"vltrain: config error: {e}")
    argv = add_or_override(argv)
    if "-m" in argv or "--multirun" in argv:
        argv.append("++hydra.callbacks.sweep_summary._target_=vltrain.sweep.SweepSummary")
    if process().distributed:
        argv += distributed_overrides(argv)
    sys.argv = [sys.argv[0], *argv]  # Hydra reads its command line from sys.argv
    if not process().distributed:
        hydra_job()
        from vltrain.train.parallel import end_process_group

        end_process_group()  # a one-process DeepSpeed run's group of one
        return 0
    from vltrain.train.parallel import clean_exit, report_fault

    code = 0
    try:
        hydra_job()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (print(e.code, file=sys.stderr) or 1)
        if code:  # every other rank ends at once with this message
            report_fault(e.code if isinstance(e.code, str) else _FAILURE[-1] if _FAILURE else f"exit status {code}")
    except BaseException as e:
        import traceback

        traceback.print_exc()
        code = 1
        report_fault(f"{type(e).__name__}: {e}")
    clean_exit(code)
    return code
