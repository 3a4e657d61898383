"""Training entry point: compose the Hydra config, validate it into a TrainConfig, call `train(cfg)`.

Run as:
    python -m vltrain                                     # tiny random InternVL on the demo data
    python -m vltrain model=internvl2-8b dataset=custom dataset.train=[data.jsonl] sft_type=lora
    python -m vltrain -m sft_type=lora,full               # Hydra multirun: one run folder per job
    torchrun --nproc_per_node 2 -m vltrain ...            # one process per device
"""

from __future__ import annotations

import logging
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
def main(cfg: DictConfig) -> float | None:
    run_dir = cfg.run_dir
    try:
        train_cfg, _ = to_train_config(cfg)
        if train_cfg.resume:  # the saved config, with the keys given on the command line
            train_cfg = resume_config(cfg, HydraConfig.get().overrides.task)
    except ConfigError as e:  # raised inside Hydra's job: exit here, or Hydra wraps it in a traceback
        discard_unused_run_dir(run_dir)
        sys.exit(f"vltrain: config error: {e}")
    from vltrain.train.checkpoint import CheckpointError
    from vltrain.train.recipe import train  # heavy imports only once the config is known to be valid
    from vltrain.train.trainer import NumericalFault

    print(OmegaConf.to_yaml(cfg, resolve=True))
    try:
        metrics = train(train_cfg)
    except (ConfigError, CheckpointError, NumericalFault) as e:  # bad rows, a full disk, a NaN: one message
        discard_unused_run_dir(run_dir)
        sys.exit(f"vltrain: {e}")
    except BaseException:
        discard_unused_run_dir(run_dir)
        raise
    log.info("final metrics: %s", metrics)
    return metrics.get("eval_exact_match", metrics.get("eval_loss"))


def entry() -> None:
    # Launchers such as `deepspeed` pass --local_rank, which Hydra's parser rejects; the rank is in LOCAL_RANK.
    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
    try:
        check_overrides(sys.argv[1:])
        argv = settle_run_dir(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"vltrain: config error: {e}")
    sys.argv = sys.argv[:1] + add_or_override(argv)
    main()


if __name__ == "__main__":
    entry()
