"""Grounding: placeholder consumption, box styles, the thousandths rounding rule at its edges, and box errors."""

from __future__ import annotations

from fractions import Fraction

import pytest
from PIL import Image

from vltrain.data.encode import IGNORE_INDEX, Encoder
from vltrain.data.grounding import fill_placeholders, format_boxes, normalize_box, to_thousandths
from vltrain.data.records import GroundingObject, Record, RecordError

SIZE = (640, 480)


def record(query="q", response="a", objects=(), history=(), n_images=1):
    return Record(query=query, response=response, history=list(history), system=None,
                  images=[f"/nowhere/{i}.png" for i in range(n_images)], videos=[], objects=list(objects),
                  source="g.jsonl", line=5)


def fill(rec, sizes=(SIZE,), style="internvl"):
    fields = []
    for i, (q, a) in enumerate(rec.rounds):
        last = i == len(rec.rounds) - 1
        fields += [("query" if last else f"history[{i}][0]", q), ("response" if last else f"history[{i}][1]", a)]
    return fill_placeholders(rec, fields, list(sizes), style)


# ---------------------------------------------------------------- the rounding rule


@pytest.mark.parametrize("value,size,expected", [
    (0, 640, 0),
    (640, 640, 1000),
    (100, 640, 156),      # 156.25 -> down
    (32.32, 640, 51),     # exactly 50.5 -> half up (ms-swift's int(c / size * 999) gives 50)
    (32.31, 640, 50),     # 50.484375 -> down
    (1, 3, 333),          # 333.33...
    (2, 3, 667),          # 666.66...
    (1.5, 3, 500),
    (479, 480, 998),      # 997.916...
    (0.5, 1000, 1),       # 0.5 -> half up
])
def test_real_coordinates_round_half_up_exactly(value, size, expected):
    assert to_thousandths(value, Fraction(1000, size)) == expected


@pytest.mark.parametrize("bbox_type,box,expected", [
    # norm_1: x1000, exact on the written decimal: float 0.5005 * 1000 is 500.49999999999994, we give 501
    ("norm_1", (0.0125, 0.0135, 0.5005, 1), (13, 14, 501, 1000)),
    ("norm_1", (0, 0.0004999, 0.9994, 0.9995), (0, 0, 999, 1000)),
    # norm_1000: as is, rounded (Python's round() would give 12 for 12.5)
    ("norm_1000", (12.5, 12.4999, 999.5, 1000), (13, 12, 1000, 1000)),
    ("norm_1", (0.0001, 0.0001, 0.0002, 0.0004), (0, 0, 0, 0)),  # a tiny box may round to zero size
    ("real", (0, 0, 640, 480), (0, 0, 1000, 1000)),
    ("real", (32.32, 240, 320, 479), (51, 500, 500, 998)),
])
def test_normalize_box(bbox_type, box, expected):
    assert normalize_box(box, bbox_type, SIZE) == expected


@pytest.mark.parametrize("bbox_type,box,message", [
    ("real", (0, 0, 641, 10), r"^box \[0, 0, 641, 10\] lies outside the 640x480 image \(x2=641\)$"),
    ("real", (0, 0, 10, 480.5), r"outside the 640x480 image \(y2=480.5\)"),
    ("real", (-1, 0, 10, 10), r"outside the 640x480 image \(x1=-1\)"),
    ("norm_1", (0, 0, 1.01, 1), r"outside norm_1's range 0\.\.1 \(x2=1.01\)"),
    ("norm_1000", (0, 0, 1000.5, 1), r"outside norm_1000's range 0\.\.1000 \(x2=1000.5\)"),
    ("real", (20, 0, 10, 10), r"^box \[20, 0, 10, 10\] is empty or inverted \(expected x1 < x2 and y1 < y2\)$"),
    ("norm_1", (0, 0.6, 1, 0.5), r"empty or inverted"),
    ("norm_1000", (5, 0, 5, 10), r"empty or inverted"),
])
def test_box_out_of_range_or_inverted(bbox_type, box, message):
    with pytest.raises(ValueError, match=message):
        normalize_box(box, bbox_type, SIZE)


def test_box_styles_one_and_several_boxes():
    assert format_boxes([(1, 2, 3, 4)]) == "<box>[[1, 2, 3, 4]]</box>"
    assert format_boxes([(1, 2, 3, 4), (5, 6, 7, 8)]) == "<box>[[1, 2, 3, 4], [5, 6, 7, 8]]</box>"
    assert format_boxes([(1, 2, 3, 4)], "swift") == "<box> [[1, 2, 3, 4]] </box>"
    assert format_boxes([(1, 2, 3, 4), (5, 6, 7, 8)], "swift") == "<box> [[1, 2, 3, 4],[5, 6, 7, 8]] </box>"
    with pytest.raises(ValueError, match="unknown box_style"):
        format_boxes([(1, 2, 3, 4)], "qwen")


# ---------------------------------------------------------------- placeholders


def test_find_and_describe_use_each_object_once_per_kind():
    man = GroundingObject(caption="the man", boxes=[(64, 48, 320, 240)], bbox_type="real")
    dogs = GroundingObject(caption="two dogs", boxes=[(0.1, 0.1, 0.2, 0.2), (0.5, 0.5, 1, 1)], bbox_type="norm_1")
    rec = record("Find <ref-object>", "<bbox>", objects=[man, dogs], history=[("What is at <bbox>?", "<ref-object>")])
    # Conversation order: history query (<bbox> #1 -> objects[0]), history response (<ref-object> #1 -> objects[0]),
    # query (<ref-object> #2 -> objects[1]), response (<bbox> #2 -> objects[1]).
    assert fill(rec) == ["What is at <box>[[100, 100, 500, 500]]</box>?", "<ref>the man</ref>",
                         "Find <ref>two dogs</ref>", "<box>[[100, 100, 200, 200], [500, 500, 1000, 1000]]</box>"]
    assert fill(rec, style="swift")[3] == "<box> [[100, 100, 200, 200],[500, 500, 1000, 1000]] </box>"


def test_boxes_use_the_size_of_their_own_image():
    objects = [GroundingObject(caption="a", boxes=[(100, 100, 200, 200)], bbox_type="real", image=1)]
    rec = record("<ref-object>", "<bbox>", objects=objects, n_images=2)
    assert fill(rec, sizes=[(1000, 1000), (200, 400)])[1] == "<box>[[500, 250, 1000, 500]]</box>"


def test_record_without_grounding_is_untouched():
    rec = record("plain <b>text</b>", "ok", objects=[])
    assert fill(rec) == ["plain <b>text</b>", "ok"]


@pytest.mark.parametrize("query,response,objects,field,message", [
    ("<ref-object> and <ref-object>", "<bbox>", 1, "query", r"<ref-object> #2 has no object \(the record has 1 object\)"),
    ("Find <ref-object>", "<bbox> <bbox>", 1, "response", "<bbox> #2 has no object"),
    ("Find <ref-object>", "<bbox>", 2, r"objects\[1\]", r"not used by any placeholder \(2 objects, 1 <ref-object> and 1"),
    ("Find it", "there", 1, r"objects\[0\]", "not used"),
    ("Find <ref-object>", "<bbox>", 0, "query", "<ref-object> #1 has no object"),
])
def test_placeholder_and_object_counts_must_agree(query, response, objects, field, message):
    obj = GroundingObject(caption="c", boxes=[(0, 0, 1, 1)], bbox_type="norm_1")
    with pytest.raises(RecordError, match=rf"^g\.jsonl:5: {field}: {message}"):
        fill(record(query, response, objects=[obj] * objects))


def test_leftover_placeholder_in_history_names_that_field():
    obj = GroundingObject(caption="c", boxes=[(0, 0, 1, 1)], bbox_type="norm_1")
    rec = record("<ref-object>", "<bbox>", objects=[obj], history=[("hi", "<bbox>")])
    with pytest.raises(RecordError, match=r"^g\.jsonl:5: response: <bbox> #2 has no object"):
        fill(rec)
    rec = record("<ref-object>", "<bbox>", objects=[obj], history=[("<ref-object>", "x")])
    with pytest.raises(RecordError, match=r"^g\.jsonl:5: query: <ref-object> #2"):
        fill(rec)


@pytest.mark.parametrize("obj,field,message", [
    (GroundingObject(caption="c", boxes=[(0, 0, 700, 10)]), r"objects\[1\]\.bbox", r"box \[0, 0, 700, 10\] lies outside the 640x480 image \(x2=700\)"),
    (GroundingObject(caption="c", boxes=[(0, 0, 1, 1), (5, 0, 1, 1)], bbox_type="norm_1000"),
     r"objects\[1\]\.bbox", r"box 2 of 2: box \[5, 0, 1, 1\] is empty or inverted"),
    (GroundingObject(caption="c", boxes=[(0, 0, 1, 1)], image=1), r"objects\[1\]\.image",
     r"image 1 does not exist \(the record has 1 image; a box needs its image\)"),
])
def test_bad_object_names_its_field(obj, field, message):
    good = GroundingObject(caption="g", boxes=[(0, 0, 1, 1)], bbox_type="norm_1")
    with pytest.raises(RecordError, match=rf"^g\.jsonl:5: {field}: {message}"):
        fill(record("<ref-object> <ref-object>", "<bbox> <bbox>", objects=[good, obj]))


# ---------------------------------------------------------------- through the encoder


def test_encoder_renders_grounding_tokens_and_trains_the_box(tokenizer, tmp_path):
    Image.new("RGB", SIZE, "white").save(tmp_path / "scene.png")
    obj = GroundingObject(caption="the cup", boxes=[(160, 120, 480, 360)], bbox_type="real")
    rec = Record(query="Find <ref-object>", response="<bbox>", history=[], system=None,
                 images=[str(tmp_path / "scene.png")], videos=[], objects=[obj], source="g.jsonl", line=1)
    encoder = Encoder(tokenizer, "Hermes-2", system="", max_tiles=1, max_length=4096, image_tokens_per_tile=2)
    sample = encoder(rec)
    text = tokenizer.decode(sample.input_ids)
    assert text == ("<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nFind <ref>the cup</ref><|im_end|>"
                    "<|im_start|>assistant\n<box>[[250, 250, 750, 750]]</box><|im_end|>")
    trained = [t for t, label in zip(sample.input_ids.tolist(), sample.labels.tolist()) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "<box>[[250, 250, 750, 750]]</box><|im_end|>"
    # <ref>, </ref>, <box>, </box> are single special tokens
    ids = sample.input_ids.tolist()
    for token in ("<ref>", "</ref>", "<box>", "</box>"):
        assert ids.count(tokenizer.convert_tokens_to_ids(token)) == 1

    swift = Encoder(tokenizer, "Hermes-2", system="", max_tiles=1, max_length=4096, image_tokens_per_tile=2,
                    box_style="swift")
    assert "<box> [[250, 250, 750, 750]] </box>" in tokenizer.decode(swift(rec).input_ids)


def test_encoder_box_error_names_file_line_and_object(tokenizer, tmp_path):
    Image.new("RGB", SIZE, "white").save(tmp_path / "scene.png")
    obj = GroundingObject(caption="x", boxes=[(0, 0, 10, 481)], bbox_type="real")
    rec = Record(query="Find <ref-object>", response="<bbox>", history=[], system=None,
                 images=[str(tmp_path / "scene.png")], videos=[], objects=[obj], source="g.jsonl", line=9)
    encoder = Encoder(tokenizer, "Hermes-2", system="", max_tiles=1, max_length=4096)
    with pytest.raises(RecordError, match=r"^g\.jsonl:9: objects\[0\]\.bbox: box \[0, 0, 10, 481\] lies outside the 640x480 "):
        encoder(rec)
