"""Collation: encoded samples -> one padded batch for InternVLForConditionalGeneration."""

from __future__ import annotations

import torch

from vltrain.data.encode import IGNORE_INDEX, Sample


def collate(samples: list[Sample], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad token sequences and concatenate image tiles.

    Notation: B samples, L = longest sequence, T_b tiles in sample b, T = sum of T_b.

    Steps:
      1. pad `input_ids` with `pad_id` and `labels` with -100 to L (right for training, left for generation);
      2. `attention_mask` is 1 on real tokens, 0 on padding, by position (never by comparing ids with pad_id:
         the pad id can be a real token);
      3. concatenate every sample's tiles in batch order; the model scatters them into the `<IMG_CONTEXT>`
         positions in the same order;
      4. record `tiles_per_sample` so a batch can be split back per sample.

    Returns:
      input_ids (B, L) int64, labels (B, L) int64, attention_mask (B, L) int64,
      tiles_per_sample (B,) int64, and pixel_values (T, 3, H, W) float only when T > 0.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    longest = max(len(s.input_ids) for s in samples)
    batch = len(samples)
    input_ids = torch.full((batch, longest), pad_id, dtype=torch.long)
    labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, longest), dtype=torch.long)
    for b, sample in enumerate(samples):
        n = len(sample.input_ids)
        span = slice(0, n) if padding_side == "right" else slice(longest - n, longest)
        input_ids[b, span] = sample.input_ids
        labels[b, span] = sample.labels
        attention_mask[b, span] = 1
    out = {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "tiles_per_sample": torch.tensor([sum(s.tiles_per_image) for s in samples], dtype=torch.long),
    }
    tiles = [s.pixel_values for s in samples if s.pixel_values is not None]
    if tiles:
        out["pixel_values"] = torch.cat(tiles)
    return out


class Collator:
    """A picklable `collate` bound to a pad id, for DataLoader workers."""

    def __init__(self, pad_id: int, padding_side: str = "right"):
        self.pad_id = pad_id
        self.padding_side = padding_side

    def __call__(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        return collate(samples, self.pad_id, self.padding_side)
