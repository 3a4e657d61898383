"""The server's own settings (`conf/serve.yaml`): what is served, where, and the limits that protect it.

Everything else (the model type, `model.path`, the template, media options) is validated as for training; with a
checkpoint, the checkpoint's saved config wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vltrain.config import ConfigError


@dataclass
class ServeOptions:
    ckpt_dir: str | None = None
    """A `checkpoint-<step>/` folder (LoRA or full) or a `-merged` folder; served as `served_model_name`."""
    adapters: dict[str, str] = field(default_factory=dict)
    """Name -> LoRA checkpoint of one base model: each is served under its name, the base under
    `served_model_name`. The base is `model.path` when given, else the one the checkpoints were trained on."""
    merge_lora: bool = False
    """With `ckpt_dir` of a LoRA checkpoint: merge it first (reusing `<ckpt>-merged`); faster generation."""
    served_model_name: str | None = None
    """The `model` clients name; None: the model type (`model.name`, e.g. `internvl2-8b`)."""
    host: str = "127.0.0.1"
    """Interface to listen on (`0.0.0.0`: every interface)."""
    port: int = 8000
    """TCP port (0: any free port, logged at start)."""
    api_key: str | None = None
    """Clients must send `Authorization: Bearer <api_key>`; None: no key asked."""
    max_batch_size: int = 8
    """Most requests answered by one `generate` call."""
    max_queue: int = 64
    """Most requests waiting or running; beyond it a request gets 429 at once."""
    batch_wait_ms: float = 5.0
    """How long the first waiting request waits for others to join its batch."""
    max_tokens: int = 512
    """`max_tokens` of a request that gives none (still capped by the context left after the prompt)."""
    max_model_len: int | None = None
    """Context (prompt + reply tokens); None: the language model's `max_position_embeddings`."""
    max_body_bytes: int = 20 * 1024 * 1024
    """Largest request body (base64 images included); larger gets 413."""
    max_images: int = 8
    """Most image and video parts in one conversation (all its messages)."""
    max_tiles: int = 48
    """Most 448 px tiles (thumbnails and video frames included) in one conversation."""
    allow_local_media: bool = False
    """Read `file://` URLs and server paths in `image_url`; off: such parts get 400."""
    media_timeout: float = 10.0
    """Seconds for fetching one image or video URL (connection, reads and the whole body)."""
    media_max_bytes: int = 20 * 1024 * 1024
    """Largest image or video a URL may return."""
    media_allowed_hosts: list[str] = field(default_factory=list)
    """Hosts image URLs may name (exact names, `*.example.com` for subdomains); empty: any host."""
    shutdown_timeout: float = 30.0
    """On SIGINT / SIGTERM, seconds the running requests get to finish before the connections are closed."""
    log_level: str = "info"
    """Level of the server's log (one line per request)."""

    def __post_init__(self):
        if self.ckpt_dir and self.adapters:
            raise ConfigError("ckpt_dir and adapters: give one (several checkpoints of one base go in adapters)")
        for key in ("max_batch_size", "max_queue", "max_tokens", "max_body_bytes", "max_images", "max_tiles",
                    "media_max_bytes"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        if self.batch_wait_ms < 0 or self.media_timeout <= 0 or self.shutdown_timeout < 0:
            raise ConfigError("batch_wait_ms and shutdown_timeout must be >= 0, media_timeout > 0")
        for name in self.adapters:
            if not name or name == self.served_model_name:
                raise ConfigError(f"adapters: name {name!r} is empty or the base model's served_model_name")
        if self.log_level.lower() not in ("critical", "error", "warning", "info", "debug"):
            raise ConfigError(f"log_level: {self.log_level!r} is not one of critical, error, warning, info, debug")
