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
from collections.abc import Iterable

import hydra
from omegaconf import DictConfig, OmegaConf

from vltrain.config import ConfigError, TrainConfig, schema_keys, suggest, training_argument_names, validate

log = logging.getLogger("vltrain")

GROUPS = ("model", "dataset", "sft_type", "parallel", "logger", "recipe")


def check_overrides(argv: list[str], extra_keys: Iterable[str] = ()) -> None:
    """Reject a misspelt command-line key before Hydra composes, with the closest valid key. `extra_keys`: keys an
    entry point takes besides the TrainConfig schema (`python -m vltrain.check`'s `show`, ...)."""
    known = schema_keys() | {f"trainer.{k}" for k in training_argument_names()} | set(extra_keys)
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key = arg.split("=", 1)[0].lstrip("+~")
        if key in GROUPS or key.startswith(("hydra.", "hydra/")) or key in known:
            continue
        # model.arch.* is a free-form architecture dict.
        if key.startswith("model.arch."):
            continue
        raise ConfigError(f"{key}: unknown config key{suggest(key, known | set(GROUPS))}")


def add_or_override(argv: list[str]) -> list[str]:
    """`key=value` -> `++key=value` for schema keys, so that a key the YAML files leave to its dataclass default
    (`data.on_error`, `data.num_proc`, ...) can be set like any other (plain `key=` is only for keys in the YAML)."""
    out = []
    for arg in argv:
        key = arg.split("=", 1)[0]
        plain = "=" in arg and not arg.startswith(("-", "+", "~"))
        out.append(f"++{arg}" if plain and key not in GROUPS and not key.startswith(("hydra.", "hydra/")) else arg)
    return out


def compose_config(overrides: list[str] = (), run_dir: str = "outputs/composed") -> TrainConfig:
    """The TrainConfig that `python -m vltrain <overrides>` would train, composed without starting a job."""
    from hydra import compose, initialize_config_module

    check_overrides(list(overrides))
    with initialize_config_module("vltrain.conf", version_base="1.3"):
        return to_train_config(compose("train", overrides=[f"run_dir={run_dir}", *add_or_override(overrides)]))


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
    try:
        metrics = train(train_cfg)
    except ConfigError as e:  # e.g. bad rows with data.on_error=raise: the list of problems, not a traceback
        sys.exit(f"vltrain: {e}")
    log.info("final metrics: %s", metrics)
    return metrics.get("eval_exact_match", metrics.get("eval_loss"))


def entry() -> None:
    # Launchers such as `deepspeed` pass --local_rank, which Hydra's parser rejects; the rank is in LOCAL_RANK.
    sys.argv = [a for a in sys.argv if not a.startswith("--local_rank")]
    try:
        check_overrides(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"vltrain: config error: {e}")
    sys.argv = sys.argv[:1] + add_or_override(sys.argv[1:])
    main()


if __name__ == "__main__":
    entry()
