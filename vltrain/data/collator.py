"""Collation: encoded samples -> one batch for InternVLForConditionalGeneration, padded or packed.

Tiles arrive as uint8 pixels (4x fewer bytes than floats); they are normalised here with the function the encoder
uses (`vltrain.data.tiling.normalise`, the same bits), or left uint8 for the trainer to normalise on its device
(what training does: `vltrain.speed.FastSteps._prepare_inputs`).
"""

from __future__ import annotations

import numpy as np
import torch

from vltrain.data.encode import IGNORE_INDEX, Sample
from vltrain.data.tiling import normalise

BATCH_INFO = ("tiles_per_sample", "sample_lengths", "record_index")
"""Keys of a batch that describe it and are no model input (`record_index`: added by the training loader)."""


def model_inputs(batch: dict) -> dict:
    """`batch` without its `BATCH_INFO` keys: what the model's forward takes."""
    return {k: v for k, v in batch.items() if k not in BATCH_INFO}


def _pixel_values(samples: list[Sample], normalise_tiles: bool = True) -> torch.Tensor | None:
    """All tiles of `samples` in order, (T, 3, S, S) float32; uint8 tiles are normalised once, after the concat
    (`normalise_tiles=False`: left uint8, for the trainer to normalise on the device)."""
    tiles = [s.pixel_values for s in samples if s.pixel_values is not None]
    if not tiles:
        return None
    if all(t.dtype == torch.uint8 for t in tiles):
        pixels = np.concatenate([t.numpy() for t in tiles])
        return normalise(pixels) if normalise_tiles else torch.from_numpy(pixels)
    return torch.cat([normalise(t.numpy()) if t.dtype == torch.uint8 else t for t in tiles])


def collate(samples: list[Sample], pad_id: int, padding_side: str = "right",
            normalise_tiles: bool = True) -> dict[str, torch.Tensor]:
    """Pad token sequences and concatenate image tiles.

    Notation: B samples, L = longest sequence, T_b tiles in sample b, T = sum of T_b.

    Steps:
      1. pad `input_ids` with `pad_id` and `labels` with -100 to L (right for training, left for generation);
      2. `attention_mask` is 1 on real tokens, 0 on padding, by position (never by comparing ids with pad_id:
         the pad id can be a real token);
      3. concatenate every sample's tiles in batch order (normalising uint8 ones); the model scatters them into
         the `<IMG_CONTEXT>` positions in the same order;
      4. record `tiles_per_sample` so a batch can be split back per sample.

    Returns:
      input_ids (B, L) int64, labels (B, L) int64, attention_mask (B, L) int64,
      tiles_per_sample, a list of B ints, and pixel_values (T, 3, H, W) float32 only when T > 0 (uint8 with
      `normalise_tiles=False` when the samples hold uint8 tiles).
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
        "tiles_per_sample": [sum(s.tiles_per_image) for s in samples],
    }
    pixel_values = _pixel_values(samples, normalise_tiles)
    if pixel_values is not None:
        out["pixel_values"] = pixel_values
    return out


def collate_packed(samples: list[Sample], normalise_tiles: bool = True) -> dict[str, torch.Tensor]:
    """All samples in ONE row, each record keeping its own attention, positions and labels.

    Notation: N = sum of the samples' lengths.

    The records stand back to back; `position_ids` restart at 0 at each record. Without an `attention_mask`,
    transformers (`masking_utils.find_packed_sequence_indices`) reads the restarts as record boundaries and builds
    a block-diagonal causal mask (sdpa, eager, flex), and flash-attention 2 turns them into varlen offsets, so no
    token attends across records. Labels stay per record: the first token of each record is a prompt token
    (label -100), so the shifted loss never trains the last token of one record to predict the next record.
    Tiles stay in record order, as the `<IMG_CONTEXT>` positions are.

    Returns:
      input_ids (1, N), labels (1, N), position_ids (1, N) int64; tiles_per_sample and sample_lengths (the
      records' token counts, summing to N: where each record starts, for per-record loss weights), lists of B
      ints; use_cache False; pixel_values (T, 3, H, W) float32 only when T > 0.
    """
    labels = torch.cat([s.labels for s in samples])
    starts = torch.tensor([0, *[len(s.input_ids) for s in samples[:-1]]]).cumsum(0)
    labels[starts] = IGNORE_INDEX
    out = {
        "input_ids": torch.cat([s.input_ids for s in samples])[None],
        "labels": labels[None],
        "position_ids": torch.cat([torch.arange(len(s.input_ids)) for s in samples])[None],
        "tiles_per_sample": [sum(s.tiles_per_image) for s in samples],
        "sample_lengths": [len(s.input_ids) for s in samples],
        "use_cache": False,  # transformers reads packed position ids only without a KV cache
    }
    pixel_values = _pixel_values(samples, normalise_tiles)
    if pixel_values is not None:
        out["pixel_values"] = pixel_values
    return out


class Collator:
    """A picklable `collate` bound to a pad id, for DataLoader workers. With `packing`, items are packs (lists of
    samples, `vltrain.data.dataset.PackedDataset`) and a batch of packs becomes one packed row.
    `normalise_tiles=False` leaves uint8 tiles uint8 (4x fewer bytes from the workers and to the device, where the
    trainer normalises them: `vltrain.speed.FastSteps._prepare_inputs`)."""

    def __init__(self, pad_id: int, padding_side: str = "right", packing: bool = False,
                 normalise_tiles: bool = True):
        self.pad_id = pad_id
        self.padding_side = padding_side
        self.packing = packing
        self.normalise_tiles = normalise_tiles

    def __call__(self, items: list) -> dict[str, torch.Tensor]:
        if self.packing:
            samples = [s for item in items for s in (item if isinstance(item, list) else [item])]
            return collate_packed(samples, self.normalise_tiles)
        return collate(items, self.pad_id, self.padding_side, self.normalise_tiles)
