"""vltrain export (also python -m vltrain.export): merge LoRA adapters into an HF-native folder, or write the
original layout.

Run as:
    vltrain export ckpt_dir=outputs/<model>/<run>/checkpoint-100 merge_lora=true     # -> ...-merged
    vltrain export ckpt_dir=outputs/<model>/<run>/checkpoint-100 to=original         # -> ...-original
        (a LoRA checkpoint on the language model only becomes an original-layout adapter; one that adapts the
        vision tower or projector, or with merge_lora=true, is merged first; ms-swift and official LoRA
        checkpoints are read too, `model.path=<base>` when their records point somewhere absent)
    vltrain export model=internvl2-8b model.path=/data/InternVL2-8B-hf to=original dst=/data/out

Keys (conf/export.yaml): ckpt_dir, merge_lora, to (hf | original), dst, overwrite, max_shard_size. What each
output holds: vltrain.model.export. Exit status 2 for a configuration error or a refused export.
"""

from __future__ import annotations

import logging

from vltrain.cli import run_command
from vltrain.config import compose_command


def export_command(argv: list[str]) -> int:
    from vltrain.model.adapters import given_model_path
    from vltrain.model.export import ExportOptions, export

    logging.basicConfig(level=logging.INFO, format="[%(name)s][%(levelname)s] - %(message)s")
    cfg, options = compose_command(argv, "export", ExportOptions, run_dir="outputs/export")
    export(cfg, options, model_path=given_model_path(argv))
    return 0


def main(argv: list[str]) -> int:
    return run_command("vltrain.export", export_command, argv, help_text=__doc__)
