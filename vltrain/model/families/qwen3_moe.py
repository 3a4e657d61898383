"""Qwen3-MoE experts: the original layout (InternVL3.5's checkpoints, saved by transformers 4.5x) keeps one MLP
module per expert, `mlp.experts.<e>.{gate,up,down}_proj.weight` of shapes (I, H), (I, H), (H, I); transformers 5
fuses them into 3D parameters, `mlp.experts.gate_up_proj` (E, 2I, H) with each expert's gate rows before its up
rows, and `mlp.experts.down_proj` (E, H, I). The router (`mlp.gate.weight`, (E, H)) keeps its name.

The experts of one layer may sit in several shards: `ExpertCollector` holds them until the layer is complete.
"""

from __future__ import annotations

import re

import torch

EXPERT_KEY = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight")
FUSED_KEY = re.compile(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)")


class ExpertCollector:
    """Per-expert tensors of the original layout, gathered until every expert of a layer's projection is there."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.parts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}

    def take(self, match: re.Match, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Store one expert tensor; returns the fused (name, tensor) pairs it completes (names without the
        `model.language_model.` prefix's `model.`: `layers.<i>.mlp.experts.<param>`)."""
        prefix, expert, proj = match[1], int(match[2]), match[3]
        if expert >= self.num_experts:
            raise ValueError(f"{match[0]}: expert {expert} but num_experts is {self.num_experts}")
        kind = "down" if proj == "down" else "gate_up"
        slot = expert if proj != "up" else self.num_experts + expert
        group = self.parts.setdefault((prefix, kind), {})
        group[slot] = tensor
        if len(group) < (self.num_experts if kind == "down" else 2 * self.num_experts):
            return []
        del self.parts[(prefix, kind)]
        layer = prefix.removeprefix("model.")
        if kind == "down":
            return [(f"{layer}.down_proj", torch.stack([group[e] for e in range(self.num_experts)]))]
        fused = torch.stack([torch.cat([group[e], group[self.num_experts + e]]) for e in range(self.num_experts)])
        return [(f"{layer}.gate_up_proj", fused)]

    def incomplete(self) -> list[str]:
        """`<prefix> <kind>: n of N experts` for every projection still missing experts."""
        out = []
        for (prefix, kind), group in sorted(self.parts.items()):
            need = self.num_experts if kind == "down" else 2 * self.num_experts
            out.append(f"{prefix} {kind}: {len(group)} of {need} expert tensors")
        return out


def split_experts(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
    """A fused native expert parameter (`...mlp.experts.gate_up_proj` / `down_proj`) -> the per-expert original
    (name, tensor) pairs under the same prefix; None for any other name."""
    m = FUSED_KEY.fullmatch(name)
    if not m:
        return None
    out = []
    if m[2] == "down_proj":
        for e in range(tensor.shape[0]):
            out.append((f"{m[1]}.{e}.down_proj.weight", tensor[e].clone()))
        return out
    half = tensor.shape[1] // 2
    for e in range(tensor.shape[0]):
        out.append((f"{m[1]}.{e}.gate_proj.weight", tensor[e, :half].clone()))
        out.append((f"{m[1]}.{e}.up_proj.weight", tensor[e, half:].clone()))
    return out
