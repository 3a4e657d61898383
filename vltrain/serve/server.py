"""`serve(cfg, options)`: load what is served and answer HTTP on one uvicorn process until SIGINT / SIGTERM.

One process owns the device; there is no `workers` setting, because each worker would load its own copy of the
model. Scale out with more processes (one per GPU) behind a load balancer. On SIGINT / SIGTERM uvicorn stops
accepting connections, the requests already running finish (for at most `shutdown_timeout` seconds), the queue
is answered, and the process exits.
"""

from __future__ import annotations

import logging

from vltrain.config import TrainConfig
from vltrain.serve.options import ServeOptions

log = logging.getLogger("vltrain.serve")


def build_server(cfg: TrainConfig, options: ServeOptions, model_path: str | None = None):
    """A `uvicorn.Server` for the app on `options.host` / `options.port` (tests run it in a thread). `model_path`:
    as for `load_served`."""
    import uvicorn

    from vltrain.serve.app import create_app
    from vltrain.serve.models import load_served

    served = load_served(cfg, options, model_path)
    app = create_app(served, options)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level=options.log_level.lower(),
                            access_log=False, timeout_graceful_shutdown=options.shutdown_timeout,
                            log_config=None, lifespan="on")
    return uvicorn.Server(config)


def serve(cfg: TrainConfig, options: ServeOptions, model_path: str | None = None) -> None:
    """Serve until interrupted (blocking)."""
    server = build_server(cfg, options, model_path)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down gracefully
        log.info("stopped")
