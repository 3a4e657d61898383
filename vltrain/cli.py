"""Composing a config from command-line overrides, once, for every entry point.

Every command (`python -m vltrain`, `vltrain.check`, `vltrain.plan`, `vltrain.infer`, `vltrain.export`) takes the
same overrides as training: a misspelt key is refused before Hydra composes (with the closest valid key), a
schema key the YAML leaves to its dataclass default can be set like any other, and the composed YAML is validated
into a `TrainConfig`. Keys a command takes besides the schema (`show=3`, `ckpt_dir=...`) come back apart, as a
plain dict, for the command to validate into its own options dataclass.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vltrain.config import ConfigError, TrainConfig, schema_keys, suggest, training_argument_names, validate

GROUPS = ("model", "dataset", "sft_type", "parallel", "logger", "recipe")


def _is_hydra_key(key: str) -> bool:
    return key in GROUPS or key.startswith(("hydra.", "hydra/"))


def check_overrides(argv: Iterable[str], extra_keys: Iterable[str] = ()) -> None:
    """Reject a misspelt command-line key before Hydra composes, with the closest valid key. `extra_keys`: keys an
    entry point takes besides the TrainConfig schema (`python -m vltrain.check`'s `show`, ...)."""
    known = schema_keys() | {f"trainer.{k}" for k in training_argument_names()} | set(extra_keys)
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key = arg.split("=", 1)[0].lstrip("+~")
        if _is_hydra_key(key) or key in known or key.startswith("model.arch."):  # arch: a free-form dict
            continue
        raise ConfigError(f"{key}: unknown config key{suggest(key, known | set(GROUPS))}")


def add_or_override(argv: Iterable[str]) -> list[str]:
    """`key=value` -> `++key=value` for schema keys, so that a key the YAML files leave to its dataclass default
    (`data.on_error`, `data.num_proc`, ...) can be set like any other (plain `key=` is only for keys in the YAML)."""
    out = []
    for arg in argv:
        key = arg.split("=", 1)[0]
        plain = "=" in arg and not arg.startswith(("-", "+", "~"))
        out.append(f"++{arg}" if plain and not _is_hydra_key(key) else arg)
    return out


def to_train_config(cfg: DictConfig | dict, extra_keys: Iterable[str] = ()) -> tuple[TrainConfig, dict[str, Any]]:
    """(TrainConfig, the command's own keys) from a composed config."""
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    extras = {k: data.pop(k) for k in extra_keys if k in data}
    data.pop("recipe", None)
    return validate(data), extras


def compose(overrides: Iterable[str] = (), config_name: str = "train", extra_keys: Iterable[str] = (),
            run_dir: str | None = None) -> tuple[TrainConfig, dict[str, Any]]:
    """What `python -m vltrain <overrides>` would train (and the command's own keys), composed without starting
    a Hydra job. `run_dir` None keeps the composed one (Hydra's run folder is only known inside a job)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    overrides = list(overrides)
    check_overrides(overrides, extra_keys)
    with initialize_config_module("vltrain.conf", version_base="1.3"):
        head = [f"run_dir={run_dir or 'outputs/composed'}"]
        cfg = hydra_compose(config_name, overrides=[*head, *add_or_override(overrides)])
    return to_train_config(cfg, extra_keys)


def compose_config(overrides: Iterable[str] = (), run_dir: str = "outputs/composed") -> TrainConfig:
    """The TrainConfig of `python -m vltrain <overrides>` (tests and the Python API)."""
    return compose(overrides, run_dir=run_dir)[0]


def run_command(prog: str, main, argv: list[str] | None = None) -> int:
    """Run `main(argv)` as command `prog`: a ConfigError (or Hydra's own composition error) is one line on stderr
    and exit status 2, never a traceback."""
    from hydra.errors import HydraException

    argv = sys.argv[1:] if argv is None else argv
    try:
        return main(argv)
    except (ConfigError, HydraException) as e:
        print(f"{prog}: {_first_paragraph(e)}", file=sys.stderr)
        return 2


def _first_paragraph(e: Exception) -> str:
    text = str(e).strip()
    return text if isinstance(e, ConfigError) else text.split("\n\n")[0]
