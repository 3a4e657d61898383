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
from omegaconf import DictConfig, OmegaConf

from vltrain.config import ConfigError, TrainConfig, _suggest, schema_keys, training_argument_names, validate

log = logging.getLogger("vltrain")

GROUPS = ("model", "dataset", "sft_type", "parallel", "logger", "recipe")


def check_overrides(argv: list[str]) -> None:
    """Reject a misspelt command-line key before Hydra composes, with the closest valid key."""
    known = schema_keys() | {f"trainer.{k}" for k in training_argument_names()}
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key = arg.split("=", 1)[0].lstrip("+~")
        if key in GROUPS or key.startswith(("hydra.", "hydra/")) or key in known:
            continue
        # model.arch.* is a free-form architecture dict.
        if key.startswith("model.arch."):
            continue
        raise ConfigError(f"{key}: unknown config key{_suggest(key, known | set(GROUPS))}")


def compose_config(overrides: list[str] = (), run_dir: str = "outputs/composed") -> TrainConfig:
    """The TrainConfig that `python -m vltrain <overrides>` would train, composed without starting a job."""
    from hydra import compose, initialize_config_module

    check_overrides(list(overrides))
    with initialize_config_module("vltrain.conf", version_base="1.3"):
        return to_train_config(compose("train", overrides=[f"run_dir={run_dir}", *overrides]))


def to_train_config(cfg: DictConfig) -> TrainConfig:
    data = OmegaConf.to_container(cfg, resolve=True)
    data.pop("recipe", None)
    return validate(data)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        train_cfg = to_train_config(cfg)
    except ConfigError as e:  # raised inside Hydra's job: exit here, or Hydra wraps it in a traceback
        sys.exit(f"vltrain: config error: {e}")
    from vltrain.train.recipe import train  # heavy imports only once the config is known to be valid

    print(OmegaConf.to_yaml(cfg, resolve=True))
    metrics = train(train_cfg)
    log.info("final metrics: %s", metrics)
    return metrics.get("eval_exact_match", metrics.get("eval_loss"))


def entry() -> None:
    # Launchers such as `deepspeed` pass --local_rank, which Hydra's parser rejects; the rank is in LOCAL_RANK.
    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
    try:
        check_overrides(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"vltrain: config error: {e}")
    main()


if __name__ == "__main__":
    entry()
