"""Composing a config from command-line overrides, once, for every entry point.

Every command (`python -m vltrain`, `vltrain.check`, `vltrain.plan`, `vltrain.infer`, `vltrain.export`) takes the
same overrides as training: a misspelt key is refused before Hydra composes (with the closest valid key), a
schema key the YAML leaves to its dataclass default can be set like any other, and the composed YAML is validated
into a `TrainConfig`. Keys a command takes besides the schema (`show=3`, `ckpt_dir=...`) come back apart, as a
plain dict, for the command to validate into its own options dataclass.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vltrain.config import (
    ConfigError,
    TrainConfig,
    build_dataclass,
    schema_keys,
    suggest,
    training_argument_names,
    validate,
)

GROUPS = ("model", "dataset", "sft_type", "parallel", "logger", "recipe")


def _is_hydra_key(key: str) -> bool:
    return key in GROUPS or key.startswith(("hydra.", "hydra/"))


def check_overrides(argv: Iterable[str], extra_keys: Iterable[str] = ()) -> None:
    """Reject a misspelt command-line key or group option before Hydra composes, with the closest valid one.
    `extra_keys`: keys an entry point takes besides the TrainConfig schema (`python -m vltrain.check`'s `show`)."""
    known = schema_keys() | {f"trainer.{k}" for k in training_argument_names()} | set(extra_keys)
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key in GROUPS:
            check_group_option(key, value)
            continue
        if _is_hydra_key(key) or key in known or key.startswith("model.arch."):  # arch: a free-form dict
            continue
        raise ConfigError(f"{key}: unknown config key{suggest(key, known | set(GROUPS))}")


def group_options(group: str) -> list[str]:
    """The options of a config group: the YAML files in `vltrain/conf/<group>/`."""
    folder = Path(__file__).resolve().parent / "conf" / group
    return sorted(p.stem for p in folder.glob("*.yaml"))


def check_group_option(group: str, value: str) -> None:
    """`model=internvl2_8b`: one line with the closest option, instead of Hydra's page-long message."""
    if group == "recipe" or "(" in value or value in ("null", ""):  # sweeps such as choice(...) left to Hydra
        return
    options = group_options(group)
    for option in value.split(","):  # a multirun sweep: lora,full
        if option not in options:
            raise ConfigError(f"{group}={option}: no such {group}{suggest(option, options)}; "
                              f"options: {', '.join(options)}")


def settle_run_dir(argv: list[str]) -> list[str]:
    """The one run folder of `python -m vltrain`, decided before Hydra creates it (Hydra writes `.hydra/` and the
    log there): `run_dir=X` becomes `hydra.run.dir=X`; `resume=<run folder or checkpoint>` continues in that run's
    folder; a new run refuses a folder that already holds a run. Hydra's config of a resumed job goes to
    `.hydra/resume-<time>/`, next to the original's."""
    from vltrain.train.checkpoint import checkpoint_step, holds_run

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
        elif not resume and holds_run(Path(folder)):
            raise ConfigError(f"run folder {Path(folder).resolve()} already holds a run; continue it with "
                              "resume=auto, or choose another hydra.run.dir")
    return out


def resume_config(cfg: DictConfig, overrides: Iterable[str]) -> TrainConfig:
    """A resumed run's config: the one its checkpoint saved, with only the keys given on the command line
    (`overrides`, Hydra's task overrides) taken from the composed `cfg`; the recipe then refuses those that
    change what is trained. A run that never saved its config starts from the composed one."""
    from vltrain.train.checkpoint import find_resume_point

    composed = OmegaConf.to_container(cfg, resolve=True)
    composed.pop("recipe", None)
    saved = find_resume_point(composed["resume"], composed["run_dir"]).saved
    if saved is None:
        return validate(composed)
    # what an earlier resume saved does not carry over to this one
    merged = {**saved, "run_dir": composed["run_dir"], "resume_only_model": False, "resume_force": False}
    for arg in overrides:
        key = arg.split("=", 1)[0].lstrip("+~")
        if "=" not in arg or key.startswith("hydra") or key == "recipe":
            continue
        node_saved, node_new, parts = merged, composed, key.split(".")
        for part in parts[:-1]:
            node_saved = node_saved.setdefault(part, {})
            node_new = node_new.get(part, {}) if isinstance(node_new, dict) else {}
        if isinstance(node_new, dict) and parts[-1] in node_new:
            node_saved[parts[-1]] = node_new[parts[-1]]
    return validate(merged)


def discard_unused_run_dir(run_dir: str | Path) -> None:
    """After a failed start: remove the run folder when it holds only what Hydra wrote (`.hydra/`, the log)."""
    folder = Path(run_dir)
    if folder.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in folder.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)


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


def compose_command(overrides: Iterable[str], config_name: str, options_class, run_dir: str):
    """(TrainConfig, options) of a command (`check`, `plan`, `infer`, `export`): the config composed from
    `conf/<config_name>.yaml` and the overrides, and the command's own keys (the fields of the dataclass
    `options_class`) as an instance of it."""
    keys = tuple(f.name for f in dataclasses.fields(options_class))
    cfg, extras = compose(overrides, config_name=config_name, extra_keys=keys, run_dir=run_dir)
    return cfg, build_dataclass(options_class, extras, "")


def compose_config(overrides: Iterable[str] = (), run_dir: str = "outputs/composed") -> TrainConfig:
    """The TrainConfig of `python -m vltrain <overrides>` (tests and the Python API)."""
    return compose(overrides, run_dir=run_dir)[0]


def run_command(prog: str, main, argv: list[str] | None = None, help_text: str = "") -> int:
    """Run `main(argv)` as command `prog`: `-h` / `--help` prints `help_text`; a ConfigError (or Hydra's own
    composition error) is one line on stderr and exit status 2, never a traceback."""
    from hydra.errors import HydraException

    argv = sys.argv[1:] if argv is None else argv
    if help_text and any(a in ("-h", "--help") for a in argv):
        print(help_text)
        return 0
    try:
        return main(argv)
    except (ConfigError, HydraException) as e:
        print(f"{prog}: {_first_paragraph(e)}", file=sys.stderr)
        return 2


def _first_paragraph(e: Exception) -> str:
    text = str(e).strip()
    return text if isinstance(e, ConfigError) else text.split("\n\n")[0]
