"""python -m vltrain.infer: chat with a model or a checkpoint, or evaluate a checkpoint on its held-out split.

Run as:
    python -m vltrain.infer ckpt_dir=outputs/tiny/<run>/checkpoint-375            # interactive chat
    python -m vltrain.infer ckpt_dir=... load_dataset_config=true                   # the held-out rows, scored
    python -m vltrain.infer ckpt_dir=... 'dataset.val=[my_val.jsonl]'              # other rows, scored
    python -m vltrain.infer ckpt_dir=... merge_lora=true                            # merge the adapters first
    python -m vltrain.infer ckpt_dir=output/internvl2-8b/v0-.../checkpoint-100      # an ms-swift LoRA checkpoint
    python -m vltrain.infer ckpt_dir=<ms-swift or official checkpoint> model.path=<its base>   # base moved
    python -m vltrain.infer model=internvl2-8b model.path=/data/InternVL2-8B        # a model folder

Keys (conf/infer.yaml): ckpt_dir, load_dataset_config, merge_lora, overwrite, result_dir, batch_size, limit,
max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty, stop_words. Exit status 2 for a
configuration error.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field

from vltrain.cli import compose_command, run_command
from vltrain.config import ConfigError


@dataclass
class InferOptions:
    ckpt_dir: str | None = None
    load_dataset_config: bool = False
    merge_lora: bool = False
    overwrite: bool = False
    result_dir: str | None = None
    batch_size: int = 8
    limit: int | None = None
    max_new_tokens: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    stop_words: list[str] = field(default_factory=list)

    def generation(self) -> dict:
        keys = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty")
        out = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        if self.stop_words:
            out["stop_words"] = list(self.stop_words)
        return out


def infer_command(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(name)s][%(levelname)s] - %(message)s")
    cfg, options = compose_command(argv, "infer", InferOptions, run_dir="outputs/infer")
    if options.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {options.batch_size}")
    val_given = any(a.lstrip("+").startswith("dataset.val=") for a in argv)
    if options.load_dataset_config and not options.ckpt_dir:
        raise ConfigError("load_dataset_config=true needs ckpt_dir=<checkpoint> (the split is the checkpoint's)")

    from vltrain.infer.session import open_session

    from vltrain.model.adapters import given_model_path

    session = open_session(cfg, options.ckpt_dir, options.merge_lora, options.overwrite, options.result_dir,
                           model_path=given_model_path(argv) if options.ckpt_dir else None)
    generation = options.generation()
    if options.load_dataset_config or val_given:
        from vltrain.infer.evaluate import evaluate, held_out_records

        if val_given:
            from vltrain.data.dataset import read_spec

            records = [r for i, spec in enumerate(cfg.dataset.val)
                       for r in read_spec(spec, cfg.dataset.seed, key=f"dataset.val[{i}]")]
        else:
            records = held_out_records(session.cfg, session.ckpt_dir)
        generation.setdefault("max_new_tokens", session.cfg.eval.max_new_tokens)
        result = evaluate(session.engine, records, session.result_dir, options.batch_size, options.limit,
                          **generation)
        print(json.dumps(result.metrics, indent=2))
        print(f"[INFO] results: {result.result_file}\n[INFO] summary: {result.summary_file}")
        return 0

    from vltrain.infer.chat import chat

    chat(session.engine, session.result_dir, merged_blocks=session.cfg.model.merge_image_blocks, generation=generation)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("vltrain.infer", infer_command, argv, help_text=__doc__)


if __name__ == "__main__":
    sys.exit(main())
