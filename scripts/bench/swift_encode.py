"""Time ms-swift 2.x's InternVL2 `template.encode` on a JSONL of records; run by `scripts/bench/data.py` with the
Python of a separate virtual environment where ms-swift 2.x is installed (never imported by vltrain).

    /path/to/swift-venv/bin/python scripts/bench/swift_encode.py RECORDS.jsonl TOKENIZER_DIR [--epochs 3]

Prints one JSON line: {"version", "records", "encoded", "seconds_per_pass": [...], "tiles", "tokens"}.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import types
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("records")
    parser.add_argument("tokenizer")
    parser.add_argument("--template", default="internvl2")
    parser.add_argument("--passes", type=int, default=1)
    args = parser.parse_args()

    import swift
    import torch
    from swift.llm import get_template
    from transformers import PreTrainedTokenizerFast

    # The folder's tokenizer.json (the InternLM2 vocabulary with InternVL's added tokens): the official folder's
    # slow tokenizer is remote code that is not available offline.
    config = json.loads((Path(args.tokenizer) / "tokenizer_config.json").read_text(encoding="utf-8"))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(Path(args.tokenizer) / "tokenizer.json"), bos_token=config.get("bos_token"),
        eos_token=config.get("eos_token"), pad_token=config.get("pad_token"), unk_token=config.get("unk_token"),
        additional_special_tokens=config.get("additional_special_tokens", []))
    template = get_template(args.template, tokenizer, max_length=None)
    template.model = types.SimpleNamespace(dtype=torch.float32, device=torch.device("cpu"))  # read by encode
    template._is_training = True  # as in `swift sft`: the image embedding is left to the model's forward hook
    rows = [json.loads(line) for line in open(args.records, encoding="utf-8")]
    seconds, tiles, tokens, encoded = [], 0, 0, 0
    for p in range(args.passes):
        start = time.process_time()
        for row in rows:
            inputs, _ = template.encode(dict(row))
            if p == 0 and inputs:
                encoded += 1
                tokens += len(inputs["input_ids"])
                pixels = inputs["_data"]["pixel_values"]
                tiles += 0 if pixels is None else pixels.shape[0]
        seconds.append(time.process_time() - start)
    print(json.dumps({"version": swift.__version__, "records": len(rows), "encoded": encoded,
                      "seconds_per_pass": seconds, "tiles": tiles, "tokens": tokens}))


if __name__ == "__main__":
    main()
