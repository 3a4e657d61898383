"""InternVL dynamic-resolution tiling: grid choice, tile crops, thumbnail and normalisation.

This module owns the image -> ``pixel_values`` path used by InternVL 1.5 / 2.0: choose a
``cols x rows`` grid of ``tile_size`` squares whose aspect ratio is closest to the image's,
resize the image once to ``(tile_size * cols, tile_size * rows)``, cut it into tiles row-major,
append a whole-image thumbnail when there is more than one tile, and normalise with the
ImageNet mean/std. Results are proven equal to the official implementation by
``tests/test_tiling.py`` against ``tests/data/tiling_golden.json``.

The encoder uses ``tile_pixels`` (uint8 tiles cut out of one array) and ``normalise``;
``tile_image`` + ``tiles_to_tensor`` are the same steps one PIL crop per tile, kept as the
readable reference that ``tile_pixels`` is tested against.
"""

from __future__ import annotations

import functools
import operator

import numpy as np
import torch
from PIL import Image

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TILE_SIZE",
    "choose_grid",
    "denormalise",
    "image_to_pixel_values",
    "normalise",
    "normalise_tensor",
    "num_tiles",
    "tile_image",
    "tile_pixels",
    "tiles_to_tensor",
]

TILE_SIZE = 448
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The official pipeline resizes with PIL's default filter, which is bicubic for RGB images
# (Pillow >= 7); we name it explicitly so a Pillow default change cannot move us.
_RESAMPLE = Image.Resampling.BICUBIC

_MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
_STD = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")
    return value


def _check_tiles(max_tiles: object, min_tiles: object) -> tuple[int, int]:
    max_tiles = _positive_int("max_tiles", max_tiles)
    min_tiles = _positive_int("min_tiles", min_tiles)
    if max_tiles < min_tiles:
        raise ValueError(f"max_tiles ({max_tiles}) must be >= min_tiles ({min_tiles})")
    return max_tiles, min_tiles


@functools.lru_cache(maxsize=128)
def _candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int, float], ...]:
    """Candidate ``(cols, rows, cols / rows)`` in the exact order the official code scans them.

    Officially the candidates are gathered into a Python ``set`` and then stable-sorted by tile
    count, so grids with the same tile count keep the set's iteration order, which is
    hash-dependent (e.g. for 6 tiles: (6,1), (2,3), (1,6), (3,2) when min=1, max=6). That order
    decides exact ties between two same-count grids (possible only when ``min_tiles > 1``, e.g.
    min=max=2 on a 5:4 image), so we rebuild the set with the same insertion sequence and rely
    on the same set semantics instead of choosing a "nicer" order.
    """
    grids: set[tuple[int, int]] = set()
    for n in range(min_tiles, max_tiles + 1):
        for cols in range(1, n + 1):
            for rows in range(1, n + 1):
                if min_tiles <= cols * rows <= max_tiles:
                    grids.add((cols, rows))
    ordered = sorted(grids, key=lambda g: g[0] * g[1])
    return tuple((cols, rows, cols / rows) for cols, rows in ordered)


def choose_grid(
    width: int,
    height: int,
    max_tiles: int,
    min_tiles: int = 1,
    tile_size: int = TILE_SIZE,
) -> tuple[int, int]:
    """Return ``(cols, rows)`` of the tile grid for a ``width x height`` image.

    The grid minimises ``|width / height - cols / rows|`` over ``min_tiles <= cols * rows <=
    max_tiles``. On an exact (float) tie, a later candidate replaces the current one only if the
    image area exceeds half the later grid's pixel area: larger grids win ties only when the
    image has enough pixels to fill them.
    """
    width = _positive_int("width", width)
    height = _positive_int("height", height)
    tile_size = _positive_int("tile_size", tile_size)
    max_tiles, min_tiles = _check_tiles(max_tiles, min_tiles)

    aspect = width / height
    twice_area = 2 * width * height
    tile_area = tile_size * tile_size
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows, ratio in _candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - ratio)
        if diff < best_diff:
            best_diff = diff
            best = (cols, rows)
        elif diff == best_diff and twice_area > tile_area * cols * rows:
            # Integer form of `area > 0.5 * tile_area * cols * rows`; best_diff is unchanged.
            best = (cols, rows)
    return best


def num_tiles(
    width: int,
    height: int,
    max_tiles: int,
    min_tiles: int = 1,
    tile_size: int = TILE_SIZE,
    use_thumbnail: bool = True,
) -> int:
    """Number of tiles ``tile_image`` yields (thumbnail included), without touching pixels."""
    cols, rows = choose_grid(width, height, max_tiles, min_tiles, tile_size)
    n = cols * rows
    return n + 1 if use_thumbnail and n > 1 else n


def _to_rgb(image: Image.Image) -> Image.Image:
    # Same as the official loader's `convert('RGB')`: alpha is dropped, not composited.
    return image if image.mode == "RGB" else image.convert("RGB")


def _grid_and_thumbnail(
    image: Image.Image, max_tiles: int, min_tiles: int, tile_size: int, use_thumbnail: bool
) -> tuple[Image.Image, int, int, Image.Image | None]:
    """The image resized to its ``cols x rows`` grid, the grid, and the thumbnail when one is due."""
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    tile_size = _positive_int("tile_size", tile_size)
    rgb = _to_rgb(image)
    cols, rows = choose_grid(rgb.width, rgb.height, max_tiles, min_tiles, tile_size)
    resized = rgb.resize((tile_size * cols, tile_size * rows), _RESAMPLE)
    thumbnail = rgb.resize((tile_size, tile_size), _RESAMPLE) if use_thumbnail and cols * rows > 1 else None
    return resized, cols, rows, thumbnail


def tile_image(
    image: Image.Image,
    max_tiles: int,
    min_tiles: int = 1,
    tile_size: int = TILE_SIZE,
    use_thumbnail: bool = True,
) -> list[Image.Image]:
    """Split ``image`` into ``cols * rows`` RGB tiles (row-major) plus an optional thumbnail.

    Every returned image is RGB and ``tile_size x tile_size``. The thumbnail (the whole image
    resized to one tile) is appended only when the grid has more than one tile.
    """
    resized, cols, rows, thumbnail = _grid_and_thumbnail(image, max_tiles, min_tiles, tile_size, use_thumbnail)
    tiles = [
        resized.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
        for r in range(rows)
        for c in range(cols)
    ]
    return tiles + [thumbnail] if thumbnail is not None else tiles


def normalise(pixels: np.ndarray) -> torch.Tensor:
    """(T, 3, S, S) uint8 tiles (any memory layout) -> contiguous (T, 3, S, S) float32, ``(x / 255 - mean) / std``.

    Same op order and dtype as torchvision's ToTensor + Normalize, so values match to the last bit. The cast is
    numpy's (one copy into a contiguous float32 array): twice as fast as torch's ``.to(float32)``, same bits.
    """
    return torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).div_(255.0).sub_(_MEAN).div_(_STD)


def normalise_tensor(pixels: torch.Tensor) -> torch.Tensor:
    """`normalise` for a (T, 3, S, S) uint8 tensor on any device (the trainer's): same ops, same order, float32."""
    if pixels.device.type == "cpu":
        return normalise(pixels.numpy())
    mean, std = _MEAN.to(pixels.device), _STD.to(pixels.device)
    return pixels.to(torch.float32).div_(255.0).sub_(mean).div_(std)


def denormalise(pixel_values: torch.Tensor) -> np.ndarray:
    """Normalised (T, 3, S, S) tiles -> the (T, 3, S, S) uint8 pixels they came from (rounded, clamped)."""
    pixels = pixel_values.detach().float().cpu() * _STD + _MEAN
    return pixels.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8).numpy()


def tiles_to_tensor(tiles: list[Image.Image]) -> torch.Tensor:
    """Stack square tiles into a normalised ``(T, 3, S, S)`` float32 tensor.

    Tiles are converted to RGB if needed; all must have the same square size.
    """
    if len(tiles) == 0:
        raise ValueError("tiles must be a non-empty list of PIL images")
    size = tiles[0].size
    if size[0] != size[1] or size[0] < 1:
        raise ValueError(f"tiles must be non-empty squares, got size {size}")
    arrays = []
    for k, tile in enumerate(tiles):
        if tile.size != size:
            raise ValueError(f"tile {k} has size {tile.size}, expected {size}")
        arrays.append(np.asarray(_to_rgb(tile), dtype=np.uint8))
    return normalise(np.stack(arrays).transpose(0, 3, 1, 2))  # (T, S, S, 3) -> (T, 3, S, S)


def tile_pixels(
    image: Image.Image,
    max_tiles: int,
    min_tiles: int = 1,
    tile_size: int = TILE_SIZE,
    use_thumbnail: bool = True,
) -> np.ndarray:
    """Image -> its (T, 3, S, S) uint8 tiles, ``T == num_tiles(...)``, ``S == tile_size``.

    The same tiles as ``tile_image`` in the same order, cut out of one array instead of one PIL crop per tile.
    """
    resized, cols, rows, thumbnail = _grid_and_thumbnail(image, max_tiles, min_tiles, tile_size, use_thumbnail)
    # (rows*S, cols*S, 3) -> (rows, S, cols, S, 3) -> (rows, cols, 3, S, S): row-major tiles.
    grid = np.asarray(resized, dtype=np.uint8).reshape(rows, tile_size, cols, tile_size, 3).transpose(0, 2, 4, 1, 3)
    chw = grid.reshape(rows * cols, 3, tile_size, tile_size)
    if thumbnail is not None:
        chw = np.concatenate([chw, np.asarray(thumbnail, dtype=np.uint8).transpose(2, 0, 1)[None]], axis=0)
    return chw


def image_to_pixel_values(
    image: Image.Image,
    max_tiles: int,
    min_tiles: int = 1,
    tile_size: int = TILE_SIZE,
    use_thumbnail: bool = True,
) -> torch.Tensor:
    """Image -> normalised ``(T, 3, S, S)`` float32 tiles: ``normalise(tile_pixels(...))``, equal to
    ``tiles_to_tensor(tile_image(...))``."""
    return normalise(tile_pixels(image, max_tiles, min_tiles, tile_size, use_thumbnail))
