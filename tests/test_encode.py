"""Records and encoding: tag placement, tile budget, masks, and errors that name file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vltrain.data.encode import IGNORE_INDEX, Encoder, place_image_tags
from vltrain.data.records import Record, RecordError, read_records
from vltrain.model.load import EMBEDDED_TOKENIZER
from vltrain.model.tokenizer import add_internvl_tokens, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    tok = load_tokenizer(EMBEDDED_TOKENIZER, template="Hermes-2")
    add_internvl_tokens(tok)
    return tok


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def images(tmp_path):
    Image.new("RGB", (448, 448), "red").save(tmp_path / "square.png")
    Image.new("RGB", (1344, 448), "blue").save(tmp_path / "wide.png")  # 3x1 grid + thumbnail
    return tmp_path


def test_untagged_images_go_to_the_first_round(images):
    record = Record("Q2", "A2", history=[("Q1", "A1")], images=[images / "square.png", images / "wide.png"])
    assert place_image_tags(record) == [("<image>\n<image>\nQ1", "A1"), ("Q2", "A2")]
    tagged = Record("Compare <image> and <image>", "same", images=[images / "square.png"] * 2)
    assert place_image_tags(tagged)[0][0] == "Compare <image> and <image>"


def test_encoding_expands_images_and_masks_prompt(tokenizer, images):
    encoder = Encoder(tokenizer, "Hermes-2", system="", max_tiles=8, max_length=4096, image_tokens_per_tile=4)
    record = Record("What colour?", "red", images=[images / "square.png", images / "wide.png"])
    sample = encoder(record)
    # Budget 8 // 2 images = 4 tiles each: the square image is 1 tile, the 3:1 image 3 tiles + thumbnail.
    assert sample.tiles_per_image == [1, 4]
    assert sample.pixel_values.shape == (5, 3, 448, 448)
    context = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert sample.input_ids.tolist().count(context) == 4 * 5
    trained = [t for t, l in zip(sample.input_ids.tolist(), sample.labels.tolist()) if l != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "red<|im_end|>"


def test_record_system_overrides_and_empty_system_removes(tokenizer):
    encoder = Encoder(tokenizer, "Hermes-2", system=None, max_tiles=1, max_length=512)
    default = tokenizer.decode(encoder(Record("hi", "yo")).input_ids)
    assert default.startswith("<|im_start|>system\n你是由上海人工智能实验室")  # the template's official default
    own = tokenizer.decode(encoder(Record("hi", "yo", system="Be brief.")).input_ids)
    assert own.startswith("<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\nhi")
    none = tokenizer.decode(encoder(Record("hi", "yo", system="")).input_ids)
    assert none.startswith("<|im_start|>user\nhi")


def test_generation_prompt_ends_with_assistant_header(tokenizer):
    encoder = Encoder(tokenizer, "Hermes-2", system="", max_tiles=1, max_length=512)
    sample = encoder(Record("hi", "yo"), for_generation=True)
    assert tokenizer.decode(sample.input_ids).endswith("<|im_start|>assistant\n")
    assert all(l == IGNORE_INDEX for l in sample.labels.tolist())


def test_too_long_row_names_file_and_line(tokenizer, images):
    rows = [{"query": "a", "response": "b"}, {"query": "<image>\nlong", "response": "c", "images": ["wide.png"]}]
    records = read_records(write_jsonl(images / "d.jsonl", rows))
    encoder = Encoder(tokenizer, "Hermes-2", system="", max_tiles=12, max_length=64, image_tokens_per_tile=256)
    with pytest.raises(RecordError, match=r"d\.jsonl:2: length: \d+ tokens after image expansion exceed"):
        encoder(records[1])


@pytest.mark.parametrize("row,where", [
    ('{"query": "a", "response": ', "1: json: invalid JSON"),
    ({"query": "a"}, "1: response: missing"),
    ({"query": 3, "response": "b"}, "1: query: expected a string, got int"),
    ({"query": "a", "response": "  "}, "1: response: empty"),
    ({"query": "a", "response": "b", "history": [["q"]]}, r"1: history\[0\]: expected a \[query, response\] pair"),
    ({"query": "a", "response": "b", "history": [["q", ""]]}, r"1: history\[0\]\[1\]: empty response"),
    ({"query": "a", "response": "b", "images": ["missing.png"]}, r"1: images\[0\]: file not found"),
    ({"query": "a", "response": "b", "imgs": []}, "1: imgs: unknown field"),
    ([1, 2], "1: row: expected a JSON object"),
])
def test_malformed_rows(tmp_path, row, where):
    path = write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(RecordError, match=r"bad\.jsonl:" + where):
        read_records(path)


def test_tag_count_mismatch(tokenizer, images):
    encoder = Encoder(tokenizer, "Hermes-2", system="", max_tiles=1, max_length=4096)
    record = Record("<image> and <image>", "b", images=[images / "square.png"], source="x.jsonl", line=7)
    with pytest.raises(RecordError, match=r"x\.jsonl:7: images: 1 images but 2 <image> tags"):
        encoder(record)
    with pytest.raises(RecordError, match=r"x\.jsonl:7: response: <image> tags belong in queries"):
        encoder(Record("q", "<image>", source="x.jsonl", line=7))


def test_corrupt_image(tokenizer, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    encoder = Encoder(tokenizer, "Hermes-2", system="", max_tiles=1, max_length=4096)
    with pytest.raises(RecordError, match=r"r\.jsonl:3: images\[0\]: cannot decode"):
        encoder(Record("q", "a", images=[tmp_path / "broken.png"], source="r.jsonl", line=3))
