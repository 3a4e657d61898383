"""vltrain: fine-tune and serve InternVL 1.5 / 2.0 vision-language models."""

import logging

__version__ = "0.1.0"

# bitsandbytes' CPU backend warns at import that an optional 4-bit kernel package is missing; transformers
# imports bitsandbytes whenever it is installed, so every command would start with that irrelevant line.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
