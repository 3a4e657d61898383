"""python -m vltrain.export: merge LoRA adapters into an HF-native folder, or write the original layout.

Run as:
    python -m vltrain.export ckpt_dir=outputs/<model>/<run>/checkpoint-100 merge_lora=true     # -> ...-merged
    python -m vltrain.export ckpt_dir=outputs/<model>/<run>/checkpoint-100 to=original         # -> ...-original
        (a LoRA checkpoint on the language model only becomes an original-layout adapter; one that adapts the
        vision tower or projector, or with merge_lora=true, is merged first; ms-swift and official LoRA
        checkpoints are read too, `model.path=<base>` when their records point somewhere absent)
    python -m vltrain.export model=internvl2-8b model.path=/data/InternVL2-8B-hf to=original dst=/data/out

Keys (conf/export.yaml): ckpt_dir, merge_lora, to (hf | original), dst, overwrite, max_shard_size. What each
output holds: vltrain.model.export. Exit status 2 for a configuration error or a refused export.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from vltrain.cli import compose_command, run_command
from vltrain.config import ConfigError


@dataclass
class ExportOptions:
    ckpt_dir: str | None = None
    merge_lora: bool = False
    to: str = "hf"
    dst: str | None = None
    overwrite: bool = False
    max_shard_size: str = "5GB"


def _check_dst(dst: Path, overwrite: bool) -> None:
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise ConfigError(f"dst={dst}: exists and is not empty; pass overwrite=true to write into it")


def export_command(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(name)s][%(levelname)s] - %(message)s")
    cfg, options = compose_command(argv, "export", ExportOptions, run_dir="outputs/export")
    if options.to not in ("hf", "original"):
        raise ConfigError(f"to: '{options.to}' is not one of hf, original")
    from vltrain.model import export

    if options.to == "hf":
        if not (options.ckpt_dir and options.merge_lora):
            raise ConfigError("to=hf exports a LoRA checkpoint merged: pass ckpt_dir=<checkpoint> merge_lora=true "
                              "(an original folder converts with python -m vltrain.convert)")
        from vltrain.model.adapters import given_model_path

        dst = export.merge_lora(options.ckpt_dir, options.dst, overwrite=options.overwrite, reuse=True,
                                model_path=given_model_path(argv))
        print(f"merged: {dst}")
        return 0

    from vltrain.model.load import load_checkpoint, load_model_tokenizer

    if options.ckpt_dir:
        ckpt = Path(options.ckpt_dir).resolve()
        dst = Path(options.dst) if options.dst else ckpt.with_name(ckpt.name + "-original")
        _check_dst(dst, options.overwrite)
        from vltrain.model.adapters import given_model_path

        try:
            model, tokenizer, run_cfg = load_checkpoint(ckpt, given_model_path(argv))
        except FileNotFoundError as e:
            raise ConfigError(f"ckpt_dir: {e}") from None
        if hasattr(model, "merge_and_unload"):
            reason = "merge_lora=true" if options.merge_lora else export.original_adapter_refusal(model)
            if reason is None:
                notes = export.save_original_lora(model, tokenizer, run_cfg.model, dst, options.max_shard_size)
                print(f"original-layout LoRA adapter: {dst}")
                for note in notes:
                    print(f"note: {note}")
                return 0
            if run_cfg.model.load_in_8bit:
                raise ConfigError("8-bit model: LoRA adapters cannot be folded into int8 weights")
            print(f"note: merging the adapter into the weights: {reason}")
            model = model.merge_and_unload()
        model_cfg = run_cfg.model
    else:
        if not options.dst:
            raise ConfigError("dst=<folder> is required with model=<type> to=original")
        dst = Path(options.dst)
        _check_dst(dst, options.overwrite)
        model, tokenizer = load_model_tokenizer(cfg.model)
        model_cfg = cfg.model
    base = export.original_base(model_cfg.path, model_cfg.hub, model_cfg.hub_token)
    notes = export.save_original(model, tokenizer, dst, model_cfg.template, model_cfg.name, model_cfg.max_tiles,
                                 base=base, hf_id=model_cfg.hf_id, max_shard_size=options.max_shard_size)
    print(f"original layout: {dst}")
    for note in notes:
        print(f"note: {note}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("vltrain.export", export_command, argv, help_text=__doc__)


if __name__ == "__main__":
    sys.exit(main())
