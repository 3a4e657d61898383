"""Encoding: a `Record` becomes token ids, labels and image tiles, exactly as the official InternVL format has it.

Steps for one record:
  1. untagged images get one `<image>\\n` each at the start of the first round's query;
  2. the tile budget `max(1, max_tiles // n_images)` is split over the images (official training rule) and
     each image is tiled (448 px tiles + thumbnail);
  3. each `<image>` becomes `<img><IMG_CONTEXT></img>` (no newline added: the record supplies its own);
  4. the template renders the conversation (assistant turns and their separator trained, the rest masked);
  5. each image's single `<IMG_CONTEXT>` is expanded to `image_tokens_per_tile x tiles` tokens (256 per 448 px
     tile for every published model: 32 x 32 patches of 14 px, halved twice by the pixel shuffle).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image, UnidentifiedImageError

from vltrain.data.records import Record, RecordError
from vltrain.data.templates import expand_image_context, get_template, render
from vltrain.data.tiling import TILE_SIZE, image_to_pixel_values
from vltrain.model.tokenizer import IMAGE_CONTEXT_TOKEN

IMAGE_TAG = "<image>"
IMAGE_BLOCK = f"<img>{IMAGE_CONTEXT_TOKEN}</img>"
IGNORE_INDEX = -100


@dataclass
class Sample:
    """One encoded record.

    input_ids, labels: (L,) int64; labels are -100 where nothing is trained.
    pixel_values: (T, 3, 448, 448) float32, all tiles of all images in order; None for text-only rows.
    tiles_per_image: tiles of each image (thumbnail included); sums to T.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None
    tiles_per_image: list[int]


class Encoder:
    """Record -> Sample for one tokenizer/template pair. Cheap to call per record in DataLoader workers."""

    def __init__(self, tokenizer, template: str, system: str | None, max_tiles: int, max_length: int,
                 image_tokens_per_tile: int = 256, tile_size: int = TILE_SIZE):
        self.tokenizer = tokenizer
        self.template = get_template(template)
        self.system = system
        self.max_tiles = max_tiles
        self.max_length = max_length
        self.image_tokens_per_tile = image_tokens_per_tile
        self.tile_size = tile_size
        self.context_id = tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT_TOKEN)

    def __call__(self, record: Record, for_generation: bool = False) -> Sample:
        """Encode a record. `for_generation`: drop the final response and end with the assistant header."""
        rounds = place_image_tags(record)
        pixel_values, tiles = self.load_tiles(record)
        turns = [(q.replace(IMAGE_TAG, IMAGE_BLOCK), a) for q, a in rounds]
        if for_generation:
            turns[-1] = (turns[-1][0], None)
        system = next(s for s in (record.system, self.system, self.template.default_system) if s is not None)
        try:
            rendered = render(self.template, self.tokenizer, turns, system or None)
        except ValueError as e:
            raise RecordError(record.source, record.line, "conversation", str(e)) from None
        ids, labels = expand_image_context(
            rendered.input_ids, rendered.labels, self.context_id, [t * self.image_tokens_per_tile for t in tiles]
        )
        if len(ids) > self.max_length and not for_generation:
            raise RecordError(record.source, record.line, "length",
                              f"{len(ids)} tokens after image expansion exceed data.max_length={self.max_length}")
        return Sample(
            input_ids=torch.tensor(ids, dtype=torch.long),
            labels=torch.tensor(labels, dtype=torch.long),
            pixel_values=pixel_values,
            tiles_per_image=tiles,
        )

    def load_tiles(self, record: Record) -> tuple[torch.Tensor | None, list[int]]:
        if not record.images:
            return None, []
        budget = max(1, self.max_tiles // len(record.images))
        tensors = []
        for i, path in enumerate(record.images):
            try:
                with Image.open(path) as image:
                    tensors.append(image_to_pixel_values(image, max_tiles=budget, tile_size=self.tile_size))
            except (UnidentifiedImageError, OSError) as e:
                raise RecordError(record.source, record.line, f"images[{i}]", f"cannot decode {path}: {e}") from None
        return torch.cat(tensors), [t.shape[0] for t in tensors]


def place_image_tags(record: Record) -> list[tuple[str, str]]:
    """The record's rounds with one `<image>` tag per image.

    Images beyond the tags in the queries get a `<image>\\n` each at the start of the first round's query
    (ms-swift 2.x's rule), so a fully untagged record reads like the official `<image>\\nQuestion` form.
    """
    rounds = record.rounds
    for i, (_, answer) in enumerate(rounds):
        if IMAGE_TAG in answer:
            name = "response" if i == len(rounds) - 1 else f"history[{i}][1]"
            raise RecordError(record.source, record.line, name, f"{IMAGE_TAG} tags belong in queries")
    tags = sum(q.count(IMAGE_TAG) for q, _ in rounds)
    missing = len(record.images) - tags
    if missing < 0:
        raise RecordError(record.source, record.line, "images",
                          f"{len(record.images)} images but {tags} {IMAGE_TAG} tags")
    if missing:
        first_query, first_response = rounds[0]
        rounds[0] = (f"{IMAGE_TAG}\n" * missing + first_query, first_response)
    return rounds
