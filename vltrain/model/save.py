"""Saving weights beyond `save_pretrained`: a model partitioned by DeepSpeed ZeRO-3 gathered one parameter at a time
into safetensors shards on the main process, and the digest that identifies a model's weights (a random base's
`base_model.json` records it, so a checkpoint copied away from its run folder can rebuild and verify its base).
"""

from __future__ import annotations

from pathlib import Path

import torch


def save_partitioned(model, folder: Path, is_main: bool, shard_bytes: int = 5 * 2**30) -> None:
    """`save_pretrained` of a model whose weights are partitioned by ZeRO-3: every process gathers one parameter
    at a time; the main process writes them in safetensors shards of about `shard_bytes` (with the index),
    so no process ever holds more than one shard besides its partition."""
    import json

    import deepspeed
    from safetensors.torch import save_file

    folder = Path(folder)
    if is_main:
        folder.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(folder)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(folder)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    total, size, files = 0, 0, 0

    def flush():
        nonlocal shard, size, files
        if shard:
            files += 1
            name = f"model-{files:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    state_names = set(model.state_dict().keys())
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if is_main and name in state_names:
                shard[name] = param.detach().to("cpu", copy=True).contiguous()
                size += shard[name].numel() * shard[name].element_size()
                total += shard[name].numel() * shard[name].element_size()
        if is_main and size >= shard_bytes:
            flush()
    if is_main:
        for name, buffer in model.named_buffers():
            if name in state_names:
                shard[name] = buffer.detach().to("cpu", copy=True).contiguous()
        flush()
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (names, dtypes, shapes, bytes): equal digests, equal weights."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
