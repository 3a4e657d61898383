"""Training hooks that transformers' native InternVLForConditionalGeneration lacks: pixel shuffle v1, drop path.

- Pixel shuffle v1: checkpoints trained with the official `ps_version: v1` (InternVL 1.5-era code) read the
  downsampled token grid transposed: the official v1 `pixel_shuffle` leaves out the final permute that v2 (and
  transformers) applies. `InternVLPsV1ForConditionalGeneration` differs from the native class in that one method
  only. Converted v1 checkpoints keep `ps_version: "v1"` in their config.json so that `model_class(config)` picks
  this class again; plain `transformers` loading of such a folder runs v2 and is silently wrong.
- Drop path (stochastic depth) in the vision layers, as the official recipe trains with (`drop_path_rate`).
"""

from __future__ import annotations

import torch
from transformers import InternVLForConditionalGeneration
from transformers.models.internvl.modeling_internvl import (
    InternVLModel,
    InternVLVisionLayer,
)

PS_V1 = "v1"


class InternVLPsV1Model(InternVLModel):
    """InternVLModel with the official v1 pixel shuffle (token grid not transposed back)."""

    def pixel_shuffle(self, vision_features: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
        """(n, w, h, c) -> (n, h*s, w*s, c/s^2): v2's steps without the last swap of the two grid axes."""
        n, w, h, c = vision_features.shape
        if (h * scale_factor) % 1 or (w * scale_factor) % 1:
            raise ValueError(f"a {w}x{h} feature grid cannot be downsampled by {scale_factor}")
        x = vision_features.reshape(n, w, int(h * scale_factor), int(c / scale_factor))
        x = x.permute(0, 2, 1, 3)
        return x.reshape(n, int(h * scale_factor), int(w * scale_factor), int(c / scale_factor**2))


class InternVLPsV1ForConditionalGeneration(InternVLForConditionalGeneration):
    """InternVLForConditionalGeneration for `ps_version: v1` checkpoints; same parameters and state-dict keys."""

    def __init__(self, config):
        super().__init__(config)
        # Swapping the class of the inner model (it adds no state) keeps the parent's construction as it is,
        # whatever transformers version builds it.
        self.model.__class__ = InternVLPsV1Model


def model_class(config) -> type[InternVLForConditionalGeneration]:
    """The class that runs `config` correctly: the ps-v1 subclass when `config.ps_version == "v1"`."""
    version = getattr(config, "ps_version", None)
    if version in (None, "v2"):
        return InternVLForConditionalGeneration
    if version == PS_V1:
        return InternVLPsV1ForConditionalGeneration
    raise ValueError(f"unknown ps_version {version!r} in the model config (expected 'v1' or 'v2')")


# ---- drop path -----------------------------------------------------------------------------------------------


class _DropPath:
    """Forward hook: zero a residual branch for whole samples with probability `rate` (training mode only),
    scaling the kept samples by 1/(1 - rate). The layer multiplies the branch by its layer scale afterwards,
    which commutes with a per-sample mask, so this equals timm's DropPath on `branch * layer_scale`."""

    def __init__(self, rate: float):
        self.rate = rate

    def __call__(self, module, args, output):
        if not module.training:
            return output
        branch = output[0] if isinstance(output, tuple) else output  # attention returns (output, weights)
        keep = 1.0 - self.rate
        mask = branch.new_empty((branch.shape[0],) + (1,) * (branch.ndim - 1)).bernoulli_(keep).div_(keep)
        return (branch * mask, *output[1:]) if isinstance(output, tuple) else branch * mask


_HANDLES = "_drop_path_handles"


def set_drop_path(model: torch.nn.Module, rate: float) -> None:
    """Stochastic depth in the vision layers: layer i of n drops its attention and MLP branches per sample with
    probability rate * i / (n - 1) (0 for the first layer), while training. Calling it again replaces the
    previous rates; rate 0 removes them and leaves the model as built. Works on a PEFT-wrapped model too."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop path rate must be in [0, 1), got {rate}")
    layers = [m for m in model.modules() if isinstance(m, InternVLVisionLayer)]
    for layer in layers:
        for handle in layer.__dict__.pop(_HANDLES, []):
            handle.remove()
    if rate == 0.0 or not layers:
        return
    for rate_i, layer in zip(torch.linspace(0.0, rate, len(layers)).tolist(), layers):
        if rate_i > 0.0:
            hook = _DropPath(rate_i)
            layer.__dict__[_HANDLES] = [layer.attention.register_forward_hook(hook),
                                        layer.mlp.register_forward_hook(hook)]


def drop_path_rates(model: torch.nn.Module) -> list[float]:
    """The drop path rate of each vision layer, in order (0.0 where none is set)."""
    rates = []
    for layer in (m for m in model.modules() if isinstance(m, InternVLVisionLayer)):
        hooks = layer.__dict__.get(_HANDLES)
        rates.append(layer.attention._forward_hooks[hooks[0].id].rate if hooks else 0.0)
    return rates
