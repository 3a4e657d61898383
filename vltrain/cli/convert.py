"""vltrain convert (also python -m vltrain.convert): an original InternVL checkpoint folder -> an HF-native
InternVLForConditionalGeneration folder; an ms-swift or official InternVL LoRA checkpoint -> a vltrain LoRA
checkpoint folder.

Run as:
    vltrain convert src=path/to/InternVL2-8B dst=path/to/InternVL2-8B-hf
    vltrain convert src=... dst=... dtype=fp32 template=internlm2-chat tokenizer=path/to/tokenizer
    vltrain convert src=output/internvl2-8b/v0-.../checkpoint-100 dst=path/to/lora [model.path=<base>]

Keys and defaults: vltrain/conf/convert.yaml. The converted model folder loads with plain transformers
(`InternVLForConditionalGeneration.from_pretrained(dst)`, `AutoTokenizer.from_pretrained(dst)`), except that a
`ps_version: v1` checkpoint must be loaded through vltrain, and a `phi3-chat` one's tokenizer too for the ids the
official training used (see vltrain.model.convert). A LoRA checkpoint of ms-swift (2.x, 3.x, `tuner_backend
swift`) or of the official scripts becomes a vltrain checkpoint (`vltrain.model.adapters.convert_adapter`).
"""

from __future__ import annotations

import logging
import sys

from vltrain.config import suggest

DTYPES = {"auto": None, "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def parse(argv: list[str]) -> dict:
    """Compose conf/convert.yaml with `key=value` overrides; one ValueError naming the key on a bad argument."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    try:
        with initialize_config_module("vltrain.conf", version_base="1.3"):
            known = list(compose("convert"))
            for arg in argv:
                key = arg.split("=", 1)[0].lstrip("+~")
                if key not in known and key != "model.path":
                    raise ValueError(f"{key}: unknown key{suggest(key, known)}; valid keys: {', '.join(known)}")
            cfg = compose("convert", overrides=list(argv))
    except HydraException as e:
        raise ValueError(str(e).splitlines()[0]) from None
    try:
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        raise ValueError(f"{e.full_key}: required (pass {e.full_key}=<folder>)") from None
    if data["dtype"] not in DTYPES:
        raise ValueError(f"dtype: {data['dtype']!r} is not one of {', '.join(DTYPES)}")
    return data


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        args = parse(argv)
    except ValueError as e:
        sys.exit(f"vltrain.convert: config error: {e}")

    import torch

    from vltrain.model.adapters import convert_adapter, foreign_format
    from vltrain.model.convert import ConversionError, convert_checkpoint

    dtype = DTYPES[args["dtype"]]
    if foreign_format(args["src"]) is not None:
        try:
            dst = convert_adapter(args["src"], args["dst"], model_path=args["model"]["path"])
        except (ConversionError, ValueError, OSError) as e:
            sys.exit(f"vltrain.convert: {e}")
        print(f"converted {args['src']} -> {dst} (LoRA checkpoint)")
        return 0
    try:
        dst = convert_checkpoint(args["src"], args["dst"], dtype=getattr(torch, dtype) if dtype else None,
                                 template=args["template"], tokenizer_path=args["tokenizer"],
                                 max_shard_size=args["max_shard_size"])
    except (ConversionError, ValueError, OSError) as e:
        sys.exit(f"vltrain.convert: {e}")
    print(f"converted {args['src']} -> {dst}")
    return 0
