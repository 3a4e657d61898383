"""vltrain serve (also python -m vltrain.serve): an OpenAI-compatible chat completions server for a checkpoint or
a model.

Run as:
    vltrain serve ckpt_dir=outputs/tiny/<run>/checkpoint-375                  # a checkpoint
    vltrain serve model=internvl2-8b model.path=/data/InternVL2-8B port=8000   # a model folder
    vltrain serve 'adapters={a: run1/checkpoint-100, b: run2/checkpoint-200}' # LoRA adapters of one base
    vltrain serve ckpt_dir=... host=0.0.0.0 api_key=secret served_model_name=my-model
    vltrain serve ckpt_dir=<ms-swift or official LoRA checkpoint> model.path=<its base>   # base moved

Keys (conf/serve.yaml, vltrain.serve.options.ServeOptions): ckpt_dir, adapters, merge_lora, served_model_name,
host, port, api_key, max_batch_size, max_queue, batch_wait_ms, max_tokens, max_model_len, max_body_bytes,
max_images, max_tiles, allow_local_media, media_timeout, media_max_bytes, media_allowed_hosts, shutdown_timeout,
log_level. Exit status 2 for a configuration error.
"""

from __future__ import annotations

import logging
from importlib.util import find_spec

from vltrain.cli import run_command
from vltrain.config import ConfigError, compose_command


def serve_command(argv: list[str]) -> int:
    from vltrain.serve.options import ServeOptions

    missing = [name for name in ("fastapi", "uvicorn", "openai", "prometheus_client") if find_spec(name) is None]
    if missing:
        raise ConfigError(f"serving needs {', '.join(missing)}: pip install 'vltrain[serve]'")
    cfg, options = compose_command(argv, "serve", ServeOptions, run_dir="outputs/serve")
    logging.basicConfig(level=options.log_level.upper(), format="%(asctime)s [%(name)s][%(levelname)s] - %(message)s")
    from vltrain.model.adapters import given_model_path
    from vltrain.serve.server import serve

    serve(cfg, options, model_path=given_model_path(argv) if options.ckpt_dir else None)
    return 0


def main(argv: list[str]) -> int:
    return run_command("vltrain.serve", serve_command, argv, help_text=__doc__)
