"""vltrain: fine-tune and serve InternVL 1.5 / 2.0 vision-language models."""

import logging

__version__ = "0.1.0"

# bitsandbytes' CPU backend warns at import that an optional 4-bit kernel package is missing; transformers
# imports bitsandbytes whenever it is installed, so every command would start with that irrelevant line.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# ms-swift's Python inference names (vltrain.api), imported on first use so that `import vltrain` stays cheap.
_API = ("get_model_tokenizer", "get_default_template_type", "get_template", "inference", "inference_stream",
        "ModelType", "seed_everything", "Swift")


def __getattr__(name: str):
    if name in _API:
        from vltrain import api

        return getattr(api, name)
    raise AttributeError(f"module 'vltrain' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))
