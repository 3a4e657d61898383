"""Tests for vltrain.data.tiling against goldens produced by the official InternVL code.

See scripts/golden/tiling.md for how tests/data/tiling_golden.json was made.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vltrain.data.tiling import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TILE_SIZE,
    choose_grid,
    image_to_pixel_values,
    num_tiles,
    tile_image,
    tiles_to_tensor,
)

GOLDEN_PATH = Path(__file__).parent / "data" / "tiling_golden.json"
REQUIRED_CONFIGS = {"1,1", "1,6", "1,12", "2,12", "1,40"}


@pytest.fixture(scope="module")
def golden() -> dict:
    with GOLDEN_PATH.open() as f:
        return json.load(f)


def _config(key: str) -> tuple[int, int]:
    mn, mx = key.split(",")
    return int(mn), int(mx)


# ---------------------------------------------------------------------------- grid goldens


def test_golden_file_is_complete(golden):
    assert golden["tile_size"] == TILE_SIZE
    assert len(golden["source"]["commit"]) == 40
    assert REQUIRED_CONFIGS <= set(golden["results"])
    n_sizes = len(golden["sizes"])
    assert n_sizes > 4000
    for key, res in golden["results"].items():
        assert len(res) == n_sizes, key
    sizes = {tuple(s) for s in golden["sizes"]}
    for extreme in [(1, 4000), (4000, 1), (1, 1), (448, 448), (896, 448), (4096, 16), (16, 4096)]:
        assert extreme in sizes


def test_every_golden_grid(golden):
    mismatches = []
    total = 0
    for key, res in golden["results"].items():
        mn, mx = _config(key)
        for (w, h), (cols, rows, n) in zip(golden["sizes"], res):
            total += 1
            got = choose_grid(w, h, mx, mn)
            got_n = num_tiles(w, h, mx, mn)
            if got != (cols, rows) or got_n != n:
                mismatches.append(((w, h, mn, mx), (cols, rows, n), (*got, got_n)))
    assert total > 60000
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[:5]}"


def test_num_tiles_agrees_with_tile_image(golden):
    # Real images for a sample of the (small) golden sizes: counts, sizes and modes of tiles.
    rng = random.Random(1234)
    small = [tuple(s) for s in golden["sizes"] if s[0] * s[1] <= 700 * 700]
    sample = rng.sample(small, 12)
    index = {tuple(s): k for k, s in enumerate(golden["sizes"])}
    for key in ("1,6", "1,12", "2,12"):
        mn, mx = _config(key)
        for w, h in sample:
            tiles = tile_image(Image.new("RGB", (w, h), (10, 20, 30)), mx, mn)
            expected_n = golden["results"][key][index[(w, h)]][2]
            assert len(tiles) == num_tiles(w, h, mx, mn) == expected_n, (w, h, key)
            assert all(t.size == (TILE_SIZE, TILE_SIZE) and t.mode == "RGB" for t in tiles)
            assert len(tile_image(Image.new("RGB", (w, h)), mx, mn, use_thumbnail=False)) == (
                num_tiles(w, h, mx, mn, use_thumbnail=False)
            )


# ---------------------------------------------------------------- hand-written known cases
# Every expectation below was checked against the official function, not derived from ours.
# Tie rule: candidates are scanned in ascending tile count; on an exact tie of
# |aspect - cols/rows| a later grid replaces the current best only if
# width*height > 0.5 * 448*448 * cols*rows.


@pytest.mark.parametrize(
    "width,height,min_tiles,max_tiles,grid,n",
    [
        # Square: 1x1, 2x2, 3x3 all have diff 0. 448*448 = 200704 is not > 0.5*200704*4.
        (448, 448, 1, 12, (1, 1), 1),
        # 896*896 = 802816 > 401408 (2x2 threshold) but not > 903168 (3x3) -> 2x2 + thumbnail.
        (896, 896, 1, 12, (2, 2), 5),
        # The 2x2 threshold is area > 401408: 633^2 = 400689 stays 1x1, 634^2 = 401956 goes 2x2.
        (633, 633, 1, 12, (1, 1), 1),
        (634, 634, 1, 12, (2, 2), 5),
        # 1344^2 passes the 3x3 threshold; 4x4 = 16 tiles exceeds max 12.
        (1344, 1344, 1, 12, (3, 3), 10),
        # Ratio 2: (2,1) exact; (4,2) ties but 896*448 = 401408 is not > 0.5*200704*8.
        (896, 448, 1, 12, (2, 1), 3),
        (448, 896, 1, 12, (1, 2), 3),
        (800, 600, 1, 12, (4, 3), 13),
        # min_tiles=2 forbids 1x1: even a 1x1 image takes the exact-ratio 2x2 grid.
        (1, 1, 2, 12, (2, 2), 5),
        (448, 448, 2, 12, (2, 2), 5),
        (1, 1, 1, 12, (1, 1), 1),
        # max 1: everything is a single tile, no thumbnail.
        (4000, 1, 1, 1, (1, 1), 1),
        (1, 1, 1, 1, (1, 1), 1),
        # Tie between different tile counts (min=1, max=2): ratio 1.5 is 0.5 from both 1x1 and
        # 2x1; 672*448 = 301056 > 200704 so 2x1 wins, a 3x2 image (area 6) keeps 1x1.
        (672, 448, 1, 2, (2, 1), 3),
        (3, 2, 1, 2, (1, 1), 1),
        # Tie between equal tile counts (min=max=2): 5:4 is 0.75 from 1x2 and 2x1. The official
        # scan order of same-count grids comes from a Python set: (1,2) then (2,1). A large
        # image passes the threshold and takes 2x1; a tiny 5x4 one keeps 1x2 (a portrait grid
        # for a landscape image).
        (560, 448, 2, 2, (2, 1), 3),
        (5, 4, 2, 2, (1, 2), 3),
        # min=max=4: scan order (4,1), (1,4), (2,2); the square grid is exact.
        (2, 2, 4, 4, (2, 2), 5),
    ],
)
def test_known_cases(width, height, min_tiles, max_tiles, grid, n):
    assert choose_grid(width, height, max_tiles, min_tiles) == grid
    assert num_tiles(width, height, max_tiles, min_tiles) == n


@pytest.mark.parametrize(
    "width,height,grid",
    [((448, 448, (2, 2))), ((317, 317, (2, 2))), ((316, 316, (1, 1))), ((224, 224, (1, 1)))],
)
def test_tile_size_enters_the_tie_rule(width, height, grid):
    # Checked against the official function with image_size=224: threshold area > 0.5*224^2*4.
    assert choose_grid(width, height, 4, 1, tile_size=224) == grid
    tiles = tile_image(Image.new("RGB", (width, height)), 4, 1, tile_size=224)
    assert len(tiles) == num_tiles(width, height, 4, 1, tile_size=224)
    assert all(t.size == (224, 224) for t in tiles)


@pytest.mark.parametrize(
    "width,height,min_tiles,max_tiles,grid",
    [
        (1, 4000, 1, 12, (1, 12)),
        (4000, 1, 1, 12, (12, 1)),
        (1, 4000, 1, 40, (1, 40)),
        (4000, 1, 1, 40, (40, 1)),
        (1, 4000, 1, 6, (1, 6)),
        (4096, 16, 1, 6, (6, 1)),
    ],
)
def test_extreme_aspect_ratios(width, height, min_tiles, max_tiles, grid):
    assert choose_grid(width, height, max_tiles, min_tiles) == grid
    assert num_tiles(width, height, max_tiles, min_tiles) == grid[0] * grid[1] + 1


def test_extreme_image_is_tiled():
    img = Image.new("RGB", (1, 4000), (255, 0, 0))
    pv = image_to_pixel_values(img, 12)
    assert pv.shape == (13, 3, TILE_SIZE, TILE_SIZE)
    wide = image_to_pixel_values(img.transpose(Image.Transpose.ROTATE_90), 12)
    assert wide.shape == (13, 3, TILE_SIZE, TILE_SIZE)


# ------------------------------------------------------------------------- pixel goldens


def synth(kind: str, w: int, h: int, mode: str) -> Image.Image:
    """Deterministic synthetic image from integer arithmetic (same recipe as the goldens)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.uint64)
    planes = []
    for c in range(4):
        cc = np.uint64(c + 1)
        if kind == "gradient":
            v = x * np.uint64(255) // np.uint64(max(w - 1, 1)) * cc
            v = (v + y * np.uint64(255) // np.uint64(max(h - 1, 1))) % np.uint64(256)
        else:
            v = (x * np.uint64(73856093)) ^ (y * np.uint64(19349663)) ^ (cc * np.uint64(83492791))
            v = (v * np.uint64(2654435761)) % np.uint64(4294967296)
            v = (v >> np.uint64(13)) % np.uint64(256)
        planes.append(v.astype(np.uint8))
    rgba = np.stack(planes, axis=-1)

    def raw(m: str, arr: np.ndarray) -> Image.Image:
        return Image.frombytes(m, (w, h), np.ascontiguousarray(arr).tobytes())

    if mode == "RGB":
        return raw("RGB", rgba[..., :3])
    if mode in ("RGBA", "CMYK"):
        return raw(mode, rgba)
    if mode == "LA":
        return raw("LA", rgba[..., :2])
    if mode == "L":
        return raw("L", rgba[..., 0])
    if mode == "P":
        im = raw("P", rgba[..., 0] // 16)
        im.putpalette([(i * 37 + k * 91) % 256 for i in range(256) for k in range(3)])
        return im
    if mode == "I;16":
        arr = rgba[..., 0].astype(np.uint16) * 3 + rgba[..., 1].astype(np.uint16) * 2
        return raw("I;16", arr.astype("<u2"))
    raise ValueError(mode)


def test_pixel_goldens(golden):
    cases = golden["pixels"]["cases"]
    assert len(cases) >= 8
    assert {"RGBA", "L", "RGB"} <= {c["mode"] for c in cases}
    for case in cases:
        img = synth(case["kind"], case["width"], case["height"], case["mode"])
        assert img.mode == case["mode"]
        pv = image_to_pixel_values(img, case["max"], case["min"])
        label = f"{case['kind']} {case['width']}x{case['height']} {case['mode']}"
        assert pv.shape == (case["n_tiles"], 3, TILE_SIZE, TILE_SIZE), label
        assert pv.dtype == torch.float32 and pv.is_contiguous()
        sums = pv.double().sum(dim=(1, 2, 3)).numpy()
        means = pv.double().mean(dim=(1, 2, 3)).numpy()
        np.testing.assert_allclose(sums, case["tile_sums"], rtol=1e-6, atol=1e-3, err_msg=label)
        np.testing.assert_allclose(means, case["tile_means"], rtol=0, atol=1e-5, err_msg=label)
        idx = torch.tensor(case["samples"])
        samples = pv[:, idx[:, 0], idx[:, 1], idx[:, 2]].numpy()
        np.testing.assert_allclose(samples, case["sample_values"], rtol=0, atol=1e-5, err_msg=label)
        # The PIL-crop path and the array-slicing path must agree exactly.
        via_tiles = tiles_to_tensor(tile_image(img, case["max"], case["min"]))
        assert torch.equal(via_tiles, pv), label


# ---------------------------------------------------------------- layout and normalisation


def _quadrants(w: int, h: int) -> Image.Image:
    colours = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 0]]], dtype=np.uint8)
    arr = colours.repeat(h // 2, axis=0).repeat(w // 2, axis=1)
    return Image.fromarray(arr)


def _expected(rgb: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor([(v / 255 - m) / s for v, m, s in zip(rgb, IMAGENET_MEAN, IMAGENET_STD)])


def test_tiles_are_row_major_with_thumbnail_last():
    # 896x896 -> 2x2 grid with no rescaling, so each tile is one solid quadrant.
    pv = image_to_pixel_values(_quadrants(896, 896), 12)
    assert pv.shape == (5, 3, TILE_SIZE, TILE_SIZE)
    for k, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]):
        centre = pv[k, :, 224, 224]
        assert torch.allclose(centre, _expected(colour), atol=1e-6), k
        assert torch.allclose(pv[k].amin(dim=(1, 2)), pv[k].amax(dim=(1, 2))), k
    thumb = pv[4]
    assert torch.allclose(thumb[:, 100, 100], _expected((255, 0, 0)), atol=1e-6)
    assert torch.allclose(thumb[:, 100, 348], _expected((0, 255, 0)), atol=1e-6)
    assert torch.allclose(thumb[:, 348, 100], _expected((0, 0, 255)), atol=1e-6)


def test_single_tile_has_no_thumbnail():
    img = _quadrants(448, 448)
    assert len(tile_image(img, 12)) == 1
    pv = image_to_pixel_values(img, 12)
    assert pv.shape == (1, 3, TILE_SIZE, TILE_SIZE)
    # 448x448 is not resized at all: pixels land unchanged.
    assert torch.allclose(pv[0, :, 0, 0], _expected((255, 0, 0)), atol=1e-6)
    assert torch.allclose(pv[0, :, 447, 447], _expected((255, 255, 0)), atol=1e-6)


def test_normalisation_values():
    colour = (255, 0, 128)
    pv = image_to_pixel_values(Image.new("RGB", (300, 200), colour), 1)
    assert pv.shape == (1, 3, TILE_SIZE, TILE_SIZE)
    expected = _expected(colour).view(3, 1, 1).expand(3, TILE_SIZE, TILE_SIZE)
    assert torch.allclose(pv[0], expected, atol=1e-6)
    # Spot check against the constants written out by hand.
    assert pv[0, 0, 0, 0].item() == pytest.approx((1.0 - 0.485) / 0.229, abs=1e-6)
    assert pv[0, 1, 0, 0].item() == pytest.approx((0.0 - 0.456) / 0.224, abs=1e-6)


# ------------------------------------------------------------------------ mode conversion


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "CMYK", "I;16", "1", "F"])
def test_any_mode_becomes_rgb_like_convert(mode):
    if mode in ("1", "F"):
        img = synth("noise", 500, 300, "L").convert(mode)
    else:
        img = synth("noise", 500, 300, mode)
    assert img.mode == mode
    tiles = tile_image(img, 6)
    assert all(t.mode == "RGB" for t in tiles)
    # The official loader calls convert('RGB') before tiling; converting first must be a no-op.
    ref = image_to_pixel_values(img.convert("RGB"), 6)
    assert torch.equal(image_to_pixel_values(img, 6), ref)
    assert torch.equal(tiles_to_tensor(tiles), ref)


def test_alpha_is_dropped_not_composited():
    arr = np.zeros((300, 500, 4), dtype=np.uint8)
    arr[..., 0], arr[..., 1], arr[..., 2] = 200, 10, 10
    arr[:, :250, 3] = 0  # fully transparent left half keeps its colour after convert('RGB')
    arr[:, 250:, 3] = 255
    pv = image_to_pixel_values(Image.frombytes("RGBA", (500, 300), arr.tobytes()), 1)
    expected = _expected((200, 10, 10)).view(3, 1, 1)
    assert torch.allclose(pv[0], expected.expand_as(pv[0]), atol=1e-6)


def test_grayscale_replicates_channels():
    img = synth("gradient", 640, 480, "L")
    raw = torch.from_numpy(np.array(tile_image(img, 6)[0])).permute(2, 0, 1)
    assert torch.equal(raw[0], raw[1]) and torch.equal(raw[1], raw[2])


# ----------------------------------------------------------------------- argument errors


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(width=100, height=100, max_tiles=2, min_tiles=3), "max_tiles"),
        (dict(width=100, height=100, max_tiles=6, min_tiles=0), "min_tiles"),
        (dict(width=100, height=100, max_tiles=0), "max_tiles"),
        (dict(width=0, height=100, max_tiles=6), "width"),
        (dict(width=100, height=-1, max_tiles=6), "height"),
        (dict(width=100, height=100, max_tiles=6, tile_size=0), "tile_size"),
        (dict(width=100.5, height=100, max_tiles=6), "width"),
        (dict(width=100, height=100, max_tiles=True), "max_tiles"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        choose_grid(**kwargs)
    with pytest.raises(ValueError, match=match):
        num_tiles(**kwargs)


def test_bad_image_arguments():
    img = Image.new("RGB", (10, 10))
    with pytest.raises(ValueError, match="max_tiles"):
        tile_image(img, 1, 2)
    with pytest.raises(ValueError, match="max_tiles"):
        image_to_pixel_values(img, 1, 2)
    with pytest.raises(ValueError, match="tile_size"):
        image_to_pixel_values(img, 6, tile_size=-448)
    with pytest.raises(ValueError, match="width"):
        tile_image(Image.new("RGB", (0, 10)), 6)
    with pytest.raises(ValueError, match="PIL"):
        tile_image(np.zeros((10, 10, 3), dtype=np.uint8), 6)
    with pytest.raises(ValueError, match="non-empty"):
        tiles_to_tensor([])
    with pytest.raises(ValueError, match="expected"):
        tiles_to_tensor([Image.new("RGB", (448, 448)), Image.new("RGB", (224, 224))])
    with pytest.raises(ValueError, match="square"):
        tiles_to_tensor([Image.new("RGB", (448, 224))])
