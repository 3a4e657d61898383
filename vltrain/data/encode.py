"""Encoding: a `Record` becomes token ids, labels and image tiles, in the official InternVL format.

Images
  - `<image>` tags may stand in any round's query and stay in that round; the k-th tag is `images[k]`.
    A tag in a response is an error.
  - Images without a tag get one `<image>\\n` each at the start of the first round's query (so a fully untagged
    record reads like the official `<image>\\nQuestion`); being first in the text, they are the first images.
  - Each `<image>` becomes `<img><IMG_CONTEXT></img>`; the replacement adds no newline of its own (the record's
    `<image>\\n` supplies it, as in the official data; ms-swift 2.x's extra newline is not reproduced).
  - Tile budget per image: `max(1, max_tiles // n_images)` with `split_tile_budget` (official training), else
    `max_tiles`; 1 for every image of a sample that holds a video. An image split into more than one tile also
    gets a whole-image thumbnail tile.
  - Each `<IMG_CONTEXT>` is expanded to `image_tokens_per_tile x tiles` tokens (256 per 448 px tile for every
    published model: 32 x 32 patches of 14 px, halved twice by the pixel shuffle).

Merged block (V1.5 model types, `merge_image_blocks`)
  - All tiles of all images go into ONE `<img>...</img>` block at the first `<image>` tag, as the V1.5 model card
    feeds several images. Allowed when the tags stand together (only whitespace between them: the whitespace is
    dropped, what follows the last tag is kept) or are absent. Text or turns between tags is an error; nothing is
    ever deleted (ms-swift 2.x deletes it). A video is an error (video is an InternVL2 feature).

Videos (InternVL2 model types)
  - `<video>` tags in queries, the m-th is `videos[m]`; videos without a tag get `<video>\\n` each at the start of
    the first round, after the untagged images (ms-swift's order: images, then videos).
  - Each video gives `video_frames` frames (the middle frame of equal segments), one tile each: the frame resized
    to 448 x 448, no thumbnail.
  - `<video>` becomes the frame lines joined by `\\n`, with no newline after the last one:
    `Frame1: <img><IMG_CONTEXT></img>\\nFrame2: ...\\nFrame8: <img><IMG_CONTEXT></img>`; the record's own `\\n`
    after the tag ends the last line. This is the official training's joining (which writes `Frame-{i}: `) with
    the model card's `Frame{i}: ` (1-based); `<video>\\nQuestion` gives exactly the model card's and ms-swift's
    text `Frame1: <img>...</img>\\n...Frame8: <img>...</img>\\nQuestion`.

Order of tiles: `pixel_values` and `tiles_per_image` follow the image blocks in the text (the model fills the
`<IMG_CONTEXT>` positions in that order): one entry per image, one per video frame. With untagged media, or tags
of images before videos, that is all images, then all frames.

Grounding (`<ref-object>`, `<bbox>`): see `vltrain/data/grounding.py`; box coordinates are scaled by the size of
the image as loaded.

Then the template renders the conversation (assistant turns and their separator trained, the rest masked). A
sample longer than `max_length` tokens after image expansion is an error (`length`), raised when the record is
encoded. Every problem is a `RecordError` (`file:line: field: message`, raised with `Record.error`, so the field is
spelled as the row wrote it: `messages[3].content` rather than `query`); a `MediaError` becomes one naming the
image or video (`images[i]`, `image[i]`, or the query holding an inline `<img>`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from vltrain.data.grounding import BOX_STYLES, fill_placeholders
from vltrain.data.media import MediaError, MediaOptions, load_image, load_video_frames
from vltrain.data.records import IMAGE_TAG, VIDEO_TAG, Record, round_field, tag_count_problem
from vltrain.data.templates import IGNORE_INDEX, expand_image_context, get_template, render, system_default
from vltrain.data.tiling import TILE_SIZE, tile_pixels
from vltrain.data.tiling import normalise as normalise_tiles
from vltrain.model.tokenizer import IMAGE_CONTEXT_TOKEN

__all__ = ["IGNORE_INDEX", "IMAGE_BLOCK", "Encoder", "Sample", "merge_image_tags", "place_media_tags"]

IMAGE_BLOCK = f"<img>{IMAGE_CONTEXT_TOKEN}</img>"
_MEDIA_TAG = re.compile(f"({IMAGE_TAG}|{VIDEO_TAG})")
_IMAGE_RUN = re.compile(rf"{IMAGE_TAG}(?:\s*{IMAGE_TAG})*")


@dataclass
class Sample:
    """One encoded record.

    input_ids, labels: (L,) int64; labels are -100 where nothing is trained.
    pixel_values: (T, 3, S, S) float32, all tiles in the order of their blocks in the text; None for text-only rows.
        (T, 3, S, S) uint8 when encoded with `normalise=False`: the pixels `vltrain.data.tiling.normalise` turns
        into exactly those floats.
    tiles_per_image: tiles of each image (thumbnail included) and of each video frame (1), in the same order;
        sums to T.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None
    tiles_per_image: list[int]


class Encoder:
    """Record -> Sample for one tokenizer/template pair. Cheap to build; called per record in DataLoader workers."""

    def __init__(self, tokenizer, template: str, system: str | None, max_tiles: int, max_length: int,
                 image_tokens_per_tile: int = 256, tile_size: int = TILE_SIZE, *, merge_image_blocks: bool = False,
                 split_tile_budget: bool = True, video_frames: int = 8, box_style: str = "internvl",
                 media: MediaOptions | None = None, thinking: bool = False):
        if box_style not in BOX_STYLES:
            raise ValueError(f"box_style must be one of {', '.join(BOX_STYLES)}, got {box_style!r}")
        if max_tiles < 1 or video_frames < 1:
            raise ValueError(f"max_tiles and video_frames must be >= 1, got {max_tiles} and {video_frames}")
        self.tokenizer = tokenizer
        self.template = get_template(template)
        self.system = system
        self.default_system = system_default(self.template, thinking)  # ValueError: no thinking mode
        self.max_tiles = max_tiles
        self.max_length = max_length
        self.image_tokens_per_tile = image_tokens_per_tile
        self.tile_size = tile_size
        self.merge_image_blocks = merge_image_blocks
        self.split_tile_budget = split_tile_budget
        self.video_frames = video_frames
        self.box_style = box_style
        self.media = media
        self.context_id = tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT_TOKEN)

    @classmethod
    def from_config(cls, cfg, tokenizer, tile_size: int, image_tokens_per_tile: int) -> Encoder:
        """The encoder a `TrainConfig` describes (template, system, thinking, tile budget, video, grounding,
        media)."""
        model, data = cfg.model, cfg.data
        return cls(tokenizer, model.template, model.system, model.max_tiles, data.max_length, image_tokens_per_tile,
                   tile_size, merge_image_blocks=model.merge_image_blocks, split_tile_budget=data.split_tile_budget,
                   video_frames=data.video_frames, box_style=data.box_style, media=MediaOptions.from_config(data),
                   thinking=model.thinking)

    def __call__(self, record: Record, for_generation: bool = False, *, normalise: bool = True) -> Sample:
        """Encode a record. `for_generation`: drop the final response and end with the assistant header.
        `normalise=False`: `pixel_values` are the uint8 pixels of the tiles (4x smaller to store or send)."""
        rounds = place_media_tags(record)
        if self.merge_image_blocks:
            if record.videos:
                raise record.error("videos", "V1.5 model types (model.merge_image_blocks=true) take no video; "
                                             "use an InternVL2 model type")
            rounds = merge_image_tags(record, rounds)
        images = [self._load_image(record, i) for i in range(len(record.images))]
        budget = self._tile_budget(len(images), has_video=bool(record.videos))
        image_pixels = [tile_pixels(im, max_tiles=budget, tile_size=self.tile_size) for im in images]
        video_pixels = [self._video_frame_tiles(record, m) for m in range(len(record.videos))]

        queries, chunks, tiles, context_counts = self._expand_media_tags(rounds, image_pixels, video_pixels)
        fields = []
        for i, (query, response) in enumerate(zip(queries, (a for _, a in rounds))):
            fields += [(round_field(i, len(rounds), 0), query), (round_field(i, len(rounds), 1), response)]
        texts = fill_placeholders(record, fields, [im.size for im in images], self.box_style)
        turns: list[tuple[str, str | None]] = list(zip(texts[0::2], texts[1::2]))
        if for_generation:
            turns[-1] = (turns[-1][0], None)

        system = next(s for s in (record.system, self.system, self.default_system) if s is not None)
        try:
            rendered = render(self.template, self.tokenizer, turns, system or None)
            ids, labels = expand_image_context(rendered.input_ids, rendered.labels, self.context_id, context_counts)
        except ValueError as e:
            raise record.error("conversation", str(e)) from None
        if len(ids) > self.max_length and not for_generation:
            raise record.error("length", f"{len(ids)} tokens after image expansion exceed "
                                         f"data.max_length={self.max_length}")
        pixel_values = None
        if chunks:
            pixels = np.concatenate(chunks)  # (T, 3, S, S) uint8
            pixel_values = normalise_tiles(pixels) if normalise else torch.from_numpy(pixels)
        return Sample(
            input_ids=torch.tensor(ids, dtype=torch.long),
            labels=torch.tensor(labels, dtype=torch.long),
            pixel_values=pixel_values,
            tiles_per_image=tiles,
        )

    def _tile_budget(self, n_images: int, has_video: bool) -> int:
        if has_video:
            return 1
        if self.split_tile_budget and n_images:
            return max(1, self.max_tiles // n_images)
        return self.max_tiles

    def _load_image(self, record: Record, i: int):
        try:
            return load_image(record.images[i], self.media)
        except MediaError as e:
            raise record.error(f"images[{i}]", str(e)) from None

    def _video_frame_tiles(self, record: Record, m: int) -> list[np.ndarray]:
        """One (1, 3, S, S) uint8 tile per frame of `videos[m]`."""
        try:
            frames = load_video_frames(record.videos[m], self.video_frames, self.media)
        except MediaError as e:
            raise record.error(f"videos[{m}]", str(e)) from None
        if not frames:
            raise record.error(f"videos[{m}]", "no frame could be read")
        return [tile_pixels(frame, max_tiles=1, tile_size=self.tile_size) for frame in frames]

    def _expand_media_tags(self, rounds, image_pixels, video_pixels):
        """Queries with every tag replaced by its blocks; the tiles, tile counts and context-token counts of the
        blocks in text order."""
        chunks: list[np.ndarray] = []
        tiles: list[int] = []
        context_counts: list[int] = []
        next_image = next_video = 0
        queries = []
        for query, _ in rounds:
            pieces = _MEDIA_TAG.split(query)
            for k in range(1, len(pieces), 2):  # odd pieces are the tags
                if pieces[k] == IMAGE_TAG:
                    # A merged block (one tag left by merge_image_tags) holds every image of the sample.
                    group = image_pixels if self.merge_image_blocks else [image_pixels[next_image]]
                    next_image += 1
                    chunks += group
                    tiles += [t.shape[0] for t in group]
                    context_counts.append(self.image_tokens_per_tile * sum(t.shape[0] for t in group))
                    pieces[k] = IMAGE_BLOCK
                else:
                    frames = video_pixels[next_video]
                    next_video += 1
                    chunks += frames
                    tiles += [1] * len(frames)
                    context_counts += [self.image_tokens_per_tile] * len(frames)
                    pieces[k] = "\n".join(f"Frame{i}: {IMAGE_BLOCK}" for i in range(1, len(frames) + 1))
            queries.append("".join(pieces))
        return queries, chunks, tiles, context_counts


def place_media_tags(record: Record) -> list[tuple[str, str]]:
    """The record's rounds with one `<image>` tag per image and one `<video>` tag per video.

    Media beyond the tags get `<image>\\n` (then `<video>\\n`) each at the start of the first round's query.
    """
    rounds = record.rounds
    n = len(rounds)
    for i, (query, answer) in enumerate(rounds):
        for part, text in enumerate((query, answer)):
            if IMAGE_CONTEXT_TOKEN in text:
                raise record.error(round_field(i, n, part), f"{IMAGE_CONTEXT_TOKEN} is reserved for image features; "
                                                            f"write {IMAGE_TAG} where an image goes")
        for tag in (IMAGE_TAG, VIDEO_TAG):
            if tag in answer:
                raise record.error(round_field(i, n, 1), f"{tag} in responses: media tags belong in queries")
    missing = {}
    for tag, media, name in ((IMAGE_TAG, record.images, "images"), (VIDEO_TAG, record.videos, "videos")):
        tags = sum(q.count(tag) for q, _ in rounds)
        problem = tag_count_problem(tag, tags, len(media))
        if problem:
            raise record.error(name, problem)
        missing[tag] = len(media) - tags
    prefix = f"{IMAGE_TAG}\n" * missing[IMAGE_TAG] + f"{VIDEO_TAG}\n" * missing[VIDEO_TAG]
    if prefix:
        rounds[0] = (prefix + rounds[0][0], rounds[0][1])
    return rounds


def merge_image_tags(record: Record, rounds: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """V1.5: the rounds with the adjacent `<image>` tags collapsed into one (whitespace between them dropped).

    Tags in different rounds or with text between them cannot be merged without deleting that text: an error.
    """
    tagged = [i for i, (q, _) in enumerate(rounds) if IMAGE_TAG in q]
    if not tagged:
        return rounds
    hint = ("V1.5 model types put all images in one block at the first <image> tag; "
            "write the tags together (\"<image>\\n<image>\\nQuestion\") or drop them")
    if len(tagged) > 1:
        names = ", ".join(record.field_name(round_field(i, len(rounds), 0)) for i in tagged)
        raise record.error(round_field(tagged[1], len(rounds), 0), f"<image> tags in more than one round ({names}): "
                                                                   + hint)
    first = tagged[0]
    query, answer = rounds[first]
    run = _IMAGE_RUN.search(query)
    if run.group().count(IMAGE_TAG) != query.count(IMAGE_TAG):
        untagged = len(record.images) - sum(q.count(IMAGE_TAG) for q, _ in record.rounds)
        placed = f" ({untagged} untagged image(s) placed at the start of the first round)" if untagged else ""
        raise record.error(round_field(first, len(rounds), 0), f"text between <image> tags{placed}: " + hint)
    rounds = list(rounds)
    rounds[first] = (query[:run.start()] + IMAGE_TAG + query[run.end():], answer)
    return rounds
