"""vltrain plan (also python -m vltrain.plan): parameters by part and the estimated GPU memory of a training run,
offline, from `model.arch` (the formula: vltrain.train.memory).

Run as: (the same overrides as training, plus `world_size`, `tiles`, `devices`, `gpu_gb`)
    vltrain plan model=internvl2-8b sft_type=full parallel=zero2 world_size=8 \
        trainer.per_device_train_batch_size=2 data.max_length=4096
    vltrain plan model=internvl2-26b parallel=device_map     # and a suggested model.device_max_memory

No weights and no tokenizer are read: the model is built on the `meta` device, so any type plans in a second.
Exit status 2 for a configuration error.
"""

from __future__ import annotations

from vltrain.cli import run_command
from vltrain.config import ConfigError, compose_command


def compose_plan(overrides: list[str]):
    from vltrain.train.memory import PlanOptions

    cfg, options = compose_command(overrides, "plan", PlanOptions, run_dir="outputs/plan")
    if options.world_size is not None and options.world_size < 1:
        raise ConfigError(f"world_size must be >= 1, got {options.world_size}")
    return cfg, options


def plan_command(argv: list[str]) -> int:
    from vltrain.train.memory import plan_text

    cfg, options = compose_plan(argv)
    print(plan_text(cfg, options))
    return 0


def main(argv: list[str]) -> int:
    return run_command("vltrain.plan", plan_command, argv, help_text=__doc__)
