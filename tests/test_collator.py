"""Collator: padding, masks and tile concatenation on inputs small enough to count by hand."""

import pytest
import torch

from vltrain.data.collator import collate
from vltrain.data.encode import Sample


def sample(ids, labels, tiles=()):
    pixel = torch.cat([torch.full((t, 3, 2, 2), float(t)) for t in tiles]) if tiles else None
    return Sample(torch.tensor(ids), torch.tensor(labels), pixel, list(tiles))


def test_right_padding_and_tiles():
    a = sample([1, 2, 3], [-100, 2, 3], tiles=(2,))       # 3 tokens, one image of 2 tiles
    b = sample([4, 5], [-100, 5])                          # text only
    c = sample([6, 7, 8, 9, 0], [-100, -100, 8, 9, 0], tiles=(1, 3))  # 5 tokens, two images: 1 + 3 tiles
    batch = collate([a, b, c], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0, 0], [4, 5, 0, 0, 0], [6, 7, 8, 9, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, -100], [-100, 5, -100, -100, -100],
                                        [-100, -100, 8, 9, 0]]
    # Position decides the mask: the real token 0 at the end of c stays attended although it equals pad_id.
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["tiles_per_sample"] == [2, 0, 4]
    assert batch["pixel_values"].shape == (6, 3, 2, 2)
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [2, 2, 1, 3, 3, 3]  # batch order, image order


def test_left_padding_for_generation():
    batch = collate([sample([1, 2, 3], [1, 2, 3]), sample([4], [4])], pad_id=9, padding_side="left")
    assert batch["input_ids"].tolist() == [[1, 2, 3], [9, 9, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_text_only_batch_has_no_pixel_values():
    batch = collate([sample([1], [1]), sample([2, 3], [2, 3])], pad_id=0)
    assert "pixel_values" not in batch
    assert batch["tiles_per_sample"] == [0, 0]


def test_bad_padding_side():
    with pytest.raises(ValueError, match="padding_side"):
        collate([sample([1], [1])], pad_id=0, padding_side="middle")


def test_uint8_tiles_are_normalised_like_the_encoder_does():
    from vltrain.data.tiling import normalise

    pixels = torch.randint(0, 256, (3, 3, 4, 4), dtype=torch.uint8)
    a = Sample(torch.tensor([1, 2]), torch.tensor([-100, 2]), pixels[:2], [2])
    b = Sample(torch.tensor([3]), torch.tensor([-100]), pixels[2:], [1])
    batch = collate([a, b], pad_id=0)
    assert batch["pixel_values"].dtype == torch.float32
    assert torch.equal(batch["pixel_values"], normalise(pixels.numpy()))  # same bits as normalising in the encoder


def test_uint8_tiles_left_for_the_device_normalise_to_the_same_bits():
    from vltrain.data.tiling import normalise, normalise_tensor

    pixels = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    batch = collate([Sample(torch.tensor([1, 2]), torch.tensor([-100, 2]), pixels, [2])], pad_id=0,
                    normalise_tiles=False)
    assert batch["pixel_values"].dtype == torch.uint8
    assert torch.equal(normalise_tensor(batch["pixel_values"]), normalise(pixels.numpy()))
