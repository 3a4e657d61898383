"""vltrain infer (also python -m vltrain.infer): chat with a model or a checkpoint, or evaluate a checkpoint on
its held-out split.

Run as:
    vltrain infer ckpt_dir=outputs/tiny/<run>/checkpoint-375            # interactive chat
    vltrain infer ckpt_dir=... load_dataset_config=true                   # the held-out rows, scored
    vltrain infer ckpt_dir=... 'dataset.val=[my_val.jsonl]'              # other rows, scored
    vltrain infer ckpt_dir=... merge_lora=true                            # merge the adapters first
    vltrain infer ckpt_dir=output/internvl2-8b/v0-.../checkpoint-100      # an ms-swift LoRA checkpoint
    vltrain infer ckpt_dir=<ms-swift or official checkpoint> model.path=<its base>   # base moved
    vltrain infer model=internvl2-8b model.path=/data/InternVL2-8B        # a model folder

Keys (conf/infer.yaml): ckpt_dir, load_dataset_config, merge_lora, overwrite, result_dir, batch_size, limit,
max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty, stop_words. Exit status 2 for a
configuration error.
"""

from __future__ import annotations

import logging

from vltrain.cli import run_command
from vltrain.config import compose_command


def infer_command(argv: list[str]) -> int:
    from vltrain.infer.session import InferOptions, infer

    logging.basicConfig(level=logging.INFO, format="[%(name)s][%(levelname)s] - %(message)s")
    cfg, options = compose_command(argv, "infer", InferOptions, run_dir="outputs/infer")
    from vltrain.model.adapters import given_model_path

    infer(cfg, options, val_given=any(a.lstrip("+").startswith("dataset.val=") for a in argv),
          model_path=given_model_path(argv) if options.ckpt_dir else None)
    return 0


def main(argv: list[str]) -> int:
    return run_command("vltrain.infer", infer_command, argv, help_text=__doc__)
