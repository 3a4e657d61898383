"""Records: the three row formats, .jsonl and .json files, media references, inline <img>, objects, and errors
that name file, line and field."""

from __future__ import annotations

import base64
import io
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from vltrain.data.records import (
    GroundingObject,
    Record,
    RecordError,
    parse_row,
    read_records,
)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def data(tmp_path):
    """A data folder with two images and a video file next to the data files."""
    (tmp_path / "img").mkdir()
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (64, 48), colour).save(tmp_path / "img" / name)
    (tmp_path / "clip.mp4").write_bytes(b"not decoded when records are read")
    return tmp_path


def png_base64() -> str:
    out = io.BytesIO()
    Image.new("RGB", (4, 4), "green").save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def same(a: Record, b: Record) -> bool:
    return replace(a, source="", line=0, row=0) == replace(b, source="", line=0, row=0)


# ---------------------------------------------------------------- formats


SWIFT_ROW = {
    "system": "Be brief.",
    "history": [["<image>\nWhat is left?", "A red square."]],
    "query": "And <image> on the right?",
    "response": "A blue one.",
    "images": ["img/a.png", "img/b.png"],
    "videos": ["clip.mp4"],
}
MESSAGES_ROW = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image>\nWhat is left?"},
        {"role": "assistant", "content": "A red square."},
        {"role": "user", "content": "And <image> on the right?"},
        {"role": "assistant", "content": "A blue one."},
    ],
    "images": ["img/a.png", "img/b.png"],
    "videos": ["clip.mp4"],
}
OFFICIAL_ROW = {
    "id": 7,
    "image": ["img/a.png", "img/b.png"],
    "video": "clip.mp4",
    "width": 64,
    "height": 48,
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "<image>\nWhat is left?"},
        {"from": "gpt", "value": "A red square."},
        {"from": "human", "value": "And <image> on the right?"},
        {"from": "gpt", "value": "A blue one."},
    ],
}


def test_swift_format(data):
    (record,) = read_records(write_jsonl(data / "d.jsonl", [SWIFT_ROW]))
    assert record.query == "And <image> on the right?" and record.response == "A blue one."
    assert record.history == [("<image>\nWhat is left?", "A red square.")]
    assert record.system == "Be brief."
    assert record.images == [str(data / "img" / "a.png"), str(data / "img" / "b.png")]
    assert record.videos == [str(data / "clip.mp4")]
    assert record.objects == [] and record.where() == f"{data / 'd.jsonl'}:1"
    assert record.rounds == [("<image>\nWhat is left?", "A red square."), ("And <image> on the right?", "A blue one.")]


def test_three_formats_give_the_same_record(data):
    records = read_records(write_jsonl(data / "d.jsonl", [SWIFT_ROW, MESSAGES_ROW, OFFICIAL_ROW]))
    assert [r.line for r in records] == [1, 2, 3]
    assert same(records[0], records[1]) and same(records[0], records[2])


def test_format_variants(data):
    def row(**fields):
        return parse_row(fields, "x.jsonl", 1, data)

    # official: one image as a string, user/assistant spellings, no system turn, empty image = none
    official = row(image="img/a.png", conversations=[{"from": "user", "value": "<image>\nHi"},
                                                     {"from": "assistant", "value": "Red."}])
    assert official.images == [str(data / "img" / "a.png")] and official.system is None
    assert row(image="", conversations=[{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]).images == []
    # swift: a single image string, null fields, an empty system (no system block) kept apart from None
    swift = row(query="q", response="r", images=str(data / "img" / "b.png"), history=None, system="", videos=None)
    assert swift.images == [str(data / "img" / "b.png")] and swift.system == "" and swift.history == []
    # conversations may carry ms-swift's images/objects fields
    boxed = row(images=["img/a.png"], objects=[{"caption": "sq", "bbox": [1, 2, 3, 4]}],
                conversations=[{"from": "human", "value": "Find <ref-object>"}, {"from": "gpt", "value": "<bbox>"}])
    assert boxed.objects == [GroundingObject("sq", [(1, 2, 3, 4)], "real", 0)]
    # untagged media are kept (the encoder places them); empty queries are allowed
    assert row(query="", response="r", images=["img/a.png", "img/b.png"]).query == ""


# ---------------------------------------------------------------- .json arrays


def test_json_array_lines(data):
    rows = [SWIFT_ROW, {"query": "q", "response": "r"}, MESSAGES_ROW]
    text = "\n\n[\n" + ",\n".join(json.dumps(r, indent=2) for r in rows) + "\n]\n"
    path = data / "d.json"
    path.write_text(text)
    starts = [i for i, line in enumerate(text.splitlines(), start=1) if line == "{"]
    records = read_records(path)
    assert [r.line for r in records] == starts and len(starts) == 3 and starts[0] == 4
    assert same(records[0], records[2])
    # one row per line, compact
    path.write_text(json.dumps(rows[:2]) + "\n")
    assert [r.line for r in read_records(path)] == [1, 1]
    path.write_text("[]")
    with pytest.raises(RecordError, match=r"d\.json:0: file: no rows"):
        read_records(path)


def test_compact_json_array_rows_are_told_apart(tmp_path):
    """json.dump(rows) puts every row on line 1: each row keeps its own position (`row`), and its problems name
    the element (`[k].field`) so that two bad rows on one line are two problems."""
    rows = [{"query": "a", "response": "b"}, {"query": "a", "response": ""}, {"query": "c", "response": "d"},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}]}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    errors: list[RecordError] = []
    records = read_records(path, errors)
    assert [(r.line, r.row, r.response) for r in records] == [(1, 1, "b"), (1, 3, "d")]
    assert [(e.line, e.row, e.field) for e in errors] == [(1, 2, "[1].response"), (1, 4, "[3].messages[1].content")]
    assert str(errors[0]).startswith(f"{path}:1: [1].response: empty response")
    assert len({r.key for r in records} | {e.key for e in errors}) == 4
    assert records[1].error("images[0]", "x").field == "[2].images[0]"
    # An indented array: one row per line, no index needed.
    path.write_text(json.dumps(rows, indent=1))
    errors = []
    read_records(path, errors)
    assert [e.field for e in errors] == ["response", "messages[1].content"]


def test_errors_pickle_with_their_row():
    import pickle

    error = pickle.loads(pickle.dumps(RecordError("d.json", 1, "[2].query", "bad", row=3)))
    assert (str(error), error.row, error.key) == ("d.json:1: [2].query: bad", 3, ("d.json", 3))


@pytest.mark.parametrize("text,where", [
    ('[\n {"query": "a", "response": "b"},\n {"query": "a", "response": 3}\n]', "3: response: expected a string"),
    ('[\n {"query": "a", "response": "b"},\n {"query": "a", "response": "b",}\n]', "3: json: invalid JSON"),
    ('[\n {"query": "a", "response": "b"},\n\n]', "4: json: invalid JSON"),
    ('[\n {"query": "a", "response": "b"}\n {"query": "a", "response": "b"}]', "3: json: invalid JSON (expected ','"),
    ('[{"query": "a", "response": "b"}]\n\n[]', "3: json: invalid JSON (text after"),
    ('\n{"query": "a", "response": "b"}', "2: file: expected a JSON array"),
    ('[\n {"query": "a", "response": "b"}', "2: json: invalid JSON"),
])
def test_json_array_errors(tmp_path, text, where):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(RecordError) as e:
        read_records(path)
    assert str(e.value).startswith(f"{path}:{where}")


def test_errors_list_collects_bad_rows(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"query": "a", "response": "b"}, "{not json", "", {"query": "a"}, {"query": "c", "response": "d"}])
    errors: list[RecordError] = []
    records = read_records(path, errors)
    assert [r.query for r in records] == ["a", "c"] and [r.line for r in records] == [1, 5]
    assert [(e.line, e.field) for e in errors] == [(2, "json"), (4, "response")]
    with pytest.raises(RecordError, match=r"d\.jsonl:2: json: invalid JSON"):
        read_records(path)


def test_file_errors(tmp_path):
    (tmp_path / "d.csv").write_text("query,response\na,b\n")
    with pytest.raises(RecordError, match=r"d\.csv:0: file: unsupported extension '\.csv' \(expected \.jsonl or \.json\)"):
        read_records(tmp_path / "d.csv")
    with pytest.raises(FileNotFoundError, match="dataset file not found"):
        read_records(tmp_path / "none.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(RecordError, match=r"blank\.jsonl:0: file: no rows"):
        read_records(tmp_path / "blank.jsonl", [])
    (tmp_path / "latin1.jsonl").write_bytes(b'{"query": "a", "response": "b"}\n{"query": "caf\xe9", "response": "b"}\n')
    with pytest.raises(RecordError, match=r"latin1\.jsonl:2: file: not UTF-8 text"):
        read_records(tmp_path / "latin1.jsonl", [])
    separator = {"query": "line\u2028separator\u0085next", "response": "b"}
    (tmp_path / "u2028.jsonl").write_text(json.dumps(separator, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_records(tmp_path / "u2028.jsonl")[0].query == separator["query"]
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"query": "a", "response": "b"}).encode())
    assert read_records(tmp_path / "bom.jsonl")[0].response == "b"


# ---------------------------------------------------------------- media references


def test_media_references(data, monkeypatch):
    b64 = png_base64()
    uri = f"data:image/png;base64,{b64}"
    absolute = str(data / "img" / "b.png")
    refs = ["img/a.png", absolute, "http://example.com/x.jpg", b64, uri]
    record = parse_row({"query": "q", "response": "r", "images": refs, "videos": ["https://example.com/v.mp4"]},
                       "x", 1, data)
    assert record.images == [str(data / "img" / "a.png"), absolute, "http://example.com/x.jpg", b64, uri]
    assert record.videos == ["https://example.com/v.mp4"]
    monkeypatch.chdir(data.parent)  # a relative data folder still gives absolute paths
    relative = parse_row({"query": "q", "response": "r", "images": ["img/a.png"]}, "x", 1, Path(data.name))
    assert relative.images == [str(data / "img" / "a.png")]


def test_inline_img(data):
    record = parse_row({"query": "Compare <img>img/b.png</img> with this.", "response": "Blue.",
                        "history": [["<img>img/a.png</img>\nWhat is it?", "Red."],
                                    ["Both: <img>img/a.png</img><img>http://x.org/c.png</img>", "Ok."]]},
                       "x.jsonl", 1, data)
    a, b = str(data / "img" / "a.png"), str(data / "img" / "b.png")
    assert record.images == [a, a, "http://x.org/c.png", b]
    assert record.history == [("<image>\nWhat is it?", "Red."), ("Both: <image><image>", "Ok.")]
    assert record.query == "Compare <image> with this."
    video = parse_row({"messages": [{"role": "user", "content": "<video>clip.mp4</video>\nWhat happens?"},
                                    {"role": "assistant", "content": "Nothing."}], "images": ["img/a.png"]},
                      "x.jsonl", 1, data)
    assert video.videos == [str(data / "clip.mp4")]
    assert video.query == "<video>\nWhat happens?" and video.images == [a]


def test_objects(data):
    def objects(value, images=("img/a.png", "img/b.png")):
        return parse_row({"query": "<ref-object> <bbox>", "response": "r", "images": list(images),
                          "objects": value}, "x", 1, data).objects

    assert objects([{"caption": "the cat", "bbox": [1, 2.5, 30, 40]}]) == \
        [GroundingObject("the cat", [(1, 2.5, 30, 40)], "real", 0)]
    multi = [{"caption": "dogs", "bbox": [[0, 0, 10, 10], [20, 20, 30, 30]], "bbox_type": "norm_1000", "image": 1}]
    assert objects(json.dumps(multi)) == [GroundingObject("dogs", [(0, 0, 10, 10), (20, 20, 30, 30)], "norm_1000", 1)]
    assert objects([{"caption": "x", "bbox": [0, 0, 1, 0.5], "bbox_type": "norm_1"}])[0].boxes == [(0, 0, 1, 0.5)]
    assert objects([["a hat", [10, 20, 30, 40]]]) == [GroundingObject("a hat", [(10, 20, 30, 40)], "norm_1000", 0)]
    assert parse_row({"query": "q", "response": "r", "objects": "[]"}, "x", 1, data).objects == []


# ---------------------------------------------------------------- malformed rows

IMG = "img/a.png"
TURNS = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
BOX = {"caption": "c", "bbox": [1, 2, 3, 4]}
GROUNDED = {"query": "Find <ref-object>", "response": "<bbox>", "images": [IMG]}


@pytest.mark.parametrize("row,field,message", [
    # JSON and row shape
    ('{"query": "a", "response": ', "json", "invalid JSON"),
    ([1, 2], "row", "expected a JSON object, got array"),
    ({"text": "hello"}, "row", "no conversation: expected query/response, messages or conversations (the row has 'text')"),
    ({}, "row", "no conversation: expected query/response, messages or conversations (the row has no fields)"),
    ({"query": "a", "response": "b", "messages": TURNS}, "row", "mixes the ms-swift and messages formats"),
    ({"messages": TURNS, "conversations": []}, "row", "mixes the messages and conversations formats"),
    ({"messages": TURNS, "system": "s"}, "system", "unknown field (a messages row puts the system prompt"),
    ({"query": "a", "response": "b", "imgs": []}, "imgs", "unknown field"),
    ({"query": "a", "response": "b", "rejected_response": "c"}, "rejected_response", "unknown field (preference"),
    ({"messages": TURNS, "image": IMG}, "image", "unknown field"),
    # ms-swift fields
    ({"query": "a"}, "response", "missing"),
    ({"response": "a"}, "query", "missing"),
    ({"query": 3, "response": "b"}, "query", "expected a string, got integer"),
    ({"query": "a", "response": "b", "system": ["s"]}, "system", "expected a string or null, got array"),
    ({"query": "a", "response": "b", "history": "[['q', 'a']]"}, "history", "expected a list of [query, response]"),
    ({"query": "a", "response": "b", "history": [["q"]]}, "history[0]", "expected a [query, response] pair"),
    ({"query": "a", "response": "b", "history": [["q", 1]]}, "history[0]", "expected a [query, response] pair"),
    # empty responses
    ({"query": "a", "response": "  "}, "response", "empty response"),
    ({"query": "a", "response": "b", "history": [["q", ""]]}, "history[0][1]", "empty response"),
    ({"messages": [*TURNS, {"role": "user", "content": "q"}, {"role": "assistant", "content": "\n"}]},
     "messages[3].content", "empty response"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},
     "conversations[1].value", "empty response"),
    # roles and turns
    ({"messages": "hi"}, "messages", "expected a non-empty list"),
    ({"messages": []}, "messages", "expected a non-empty list"),
    ({"messages": ["q", "a"]}, "messages[0]", "expected an object with 'role' and 'content', got string"),
    ({"messages": [{"role": "user"}, TURNS[1]]}, "messages[0].content", "missing"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]}, TURNS[1]]},
     "messages[0].content", "expected a string, got array (one string per turn"),
    ({"messages": [{"role": "user", "content": "q", "name": "bob"}, TURNS[1]]}, "messages[0].name", "unknown field"),
    ({"messages": [{"role": "human", "content": "q"}, TURNS[1]]}, "messages[0].role", "unknown role 'human'"),
    ({"messages": [TURNS[0], TURNS[0], TURNS[1]]}, "messages[1].role", "expected a assistant turn"),
    ({"messages": [TURNS[1], TURNS[0]]}, "messages[0].role", "expected a user turn"),
    ({"messages": [*TURNS, TURNS[0]]}, "messages[2].role", "the conversation ends with a user turn"),
    ({"messages": [*TURNS, {"role": "system", "content": "s"}]}, "messages[2].role", "a system turn may only come"),
    ({"messages": [{"role": "system", "content": "s"}]}, "messages", "no user and assistant turns"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
     "conversations[1].from", "unknown role 'bot'"),
    ({"conversations": [{"from": "human", "value": "q"}]}, "conversations[0].from", "the conversation ends with"),
    # media references
    ({"query": "a", "response": "b", "images": ["missing.png"]}, "images[0]", "file not found"),
    ({"query": "a", "response": "b", "images": [IMG, None]}, "images[1]", "expected a path, URL or base64 string"),
    ({"query": "a", "response": "b", "images": [IMG, ""]}, "images[1]", "expected a path, URL or base64 string, got an"),
    ({"query": "a", "response": "b", "images": {"a": 1}}, "images", "expected a list of strings, got object"),
    ({"query": "a", "response": "b", "images": ["data:text/plain;base64,aGk="]}, "images[0]", "data:text/plain"),
    ({"query": "a", "response": "b", "videos": ["missing.mp4"]}, "videos[0]", "file not found"),
    ({"query": "a", "response": "b", "videos": ["data:video/mp4;base64,AAAA"]}, "videos[0]", "data:video"),
    ({"image": ["missing.png"], "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
     "image[0]", "file not found"),
    ({"image": IMG, "images": [IMG], "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
     "images", "both 'image' and 'images' given"),
    ({"query": "<img>missing.png</img>", "response": "b"}, "query", "file not found"),
    # tags against media
    ({"query": "<image> and <image>", "response": "b", "images": [IMG]}, "images",
     "2 <image> tags in the queries but 1 image"),
    ({"query": "<image>", "response": "b"}, "images", "1 <image> tag in the queries but 0 images"),
    ({"query": "<video>", "response": "b", "images": [IMG]}, "videos", "1 <video> tag in the queries but 0 videos"),
    ({"video": "clip.mp4", "conversations": [{"from": "human", "value": "<video><video>"},
                                             {"from": "gpt", "value": "a"}]}, "video", "2 <video> tags"),
    ({"query": "q", "response": "<image>", "images": [IMG]}, "response", "<image> in responses"),
    ({"query": "q", "response": "a", "history": [["q", "see <img>img/a.png</img>"]]}, "history[0][1]",
     "<img>img/a.png</img> in responses"),
    ({"query": "q", "response": "a", "system": "<image>"}, "system", "<image> in the system prompt"),
    ({"query": "<img>img/a.png</img>", "response": "b", "images": [IMG]}, "query",
     "inline '<img>img/a.png</img>' cannot be combined with the 'images' field"),
    ({"query": "<image> <img>img/a.png</img>", "response": "b"}, "query",
     "inline '<img>img/a.png</img>' cannot be combined with <image> tags"),
    ({"messages": [{"role": "user", "content": "<image>"}, TURNS[1], {"role": "user", "content": "<img>a</img>"},
                   TURNS[1]]}, "messages[2].content", "inline '<img>a</img>' cannot be combined with <image> tags"),
    # objects and placeholders
    ({**GROUNDED, "objects": "[{"}, "objects", "a string must hold a JSON list"),
    ({**GROUNDED, "objects": {"caption": "c"}}, "objects", "expected a list"),
    ({**GROUNDED, "objects": [5]}, "objects[0]", "expected an object {caption, bbox, bbox_type, image}, got integer"),
    ({**GROUNDED, "objects": [{"bbox": [1, 2, 3, 4]}]}, "objects[0].caption", "missing"),
    ({**GROUNDED, "objects": [{"caption": 1, "bbox": [1, 2, 3, 4]}]}, "objects[0].caption", "expected a string"),
    ({**GROUNDED, "objects": [{"caption": "c"}]}, "objects[0].bbox", "missing"),
    ({**GROUNDED, "objects": [{**BOX, "box": 1}]}, "objects[0].box", "unknown field"),
    ({**GROUNDED, "objects": [{**BOX, "bbox": [1, 2, 3]}]}, "objects[0].bbox", "expected [x1, y1, x2, y2] (4 numbers)"),
    ({**GROUNDED, "objects": [{**BOX, "bbox": ["1", 2, 3, 4]}]}, "objects[0].bbox", "expected [x1, y1, x2, y2]"),
    ({**GROUNDED, "objects": [{**BOX, "bbox": [1, 2, True, 4]}]}, "objects[0].bbox", "expected [x1, y1, x2, y2]"),
    ({**GROUNDED, "objects": [{**BOX, "bbox": []}]}, "objects[0].bbox", "expected [x1, y1, x2, y2]"),
    ({**GROUNDED, "objects": [{**BOX, "bbox": [[1, 2, 3, 4], [1, 2]]}]}, "objects[0].bbox[1]", "expected [x1, y1"),
    ({**GROUNDED, "objects": [{**BOX, "bbox": [5, 2, 3, 4]}]}, "objects[0].bbox", "box [5, 2, 3, 4] is empty or inverted"),
    ({**GROUNDED, "objects": [{**BOX, "bbox": [1, 4, 3, 4]}]}, "objects[0].bbox", "box [1, 4, 3, 4] is empty or inverted"),
    ({**GROUNDED, "objects": [{**BOX, "bbox": [-1, 2, 3, 4]}]}, "objects[0].bbox", "negative coordinate"),
    ({**GROUNDED, "objects": [{**BOX, "bbox": [1, 2, 3, 1001], "bbox_type": "norm_1000"}]}, "objects[0].bbox",
     "coordinate above 1000"),
    ({**GROUNDED, "objects": [{**BOX, "bbox": [0.1, 0.2, 1.5, 0.4], "bbox_type": "norm_1"}]}, "objects[0].bbox",
     "coordinate above 1"),
    ({**GROUNDED, "objects": [{**BOX, "bbox_type": "pixels"}]}, "objects[0].bbox_type", "expected one of real"),
    ({**GROUNDED, "objects": [{**BOX, "image": 1}]}, "objects[0].image", "image 1 does not exist (the row has 1 image;"),
    ({**GROUNDED, "objects": [{**BOX, "image": "0"}]}, "objects[0].image", "expected an image index, got string"),
    ({**GROUNDED, "images": [], "objects": [BOX]}, "objects[0].image", "image 0 does not exist (the row has 0 images"),
    ({**GROUNDED}, "query", "<ref-object> placeholder but the row has no objects"),
    ({"query": "q", "response": "a", "history": [["Where?", "<bbox>"]]}, "history[0][1]", "<bbox> placeholder but"),
    ({"query": "q", "response": "a", "images": [IMG], "objects": [BOX]}, "objects", "1 object but no <ref-object>"),
    ({**GROUNDED, "objects": [BOX], "system": "Use <bbox>."}, "system", "<bbox> in the system prompt"),
])
def test_malformed_rows(data, row, field, message):
    path = write_jsonl(data / "bad.jsonl", [{"query": "fine", "response": "row"}, row])
    with pytest.raises(RecordError) as e:
        read_records(path)
    assert str(e.value).startswith(f"{path}:2: {field}: {message}"), str(e.value)
    assert (e.value.line, e.value.field) == (2, field)


def test_base64_that_is_not_an_image_is_a_missing_file(data):
    text = base64.b64encode(b"just some text, long enough to look like data").decode()
    with pytest.raises(RecordError, match=re.escape("x:3: images[0]: file not found: ")):
        parse_row({"query": "q", "response": "r", "images": [text]}, "x", 3, data)
    long_path = "a" * 5000
    with pytest.raises(RecordError, match=r"x:3: images\[0\]: file not found: .*\(50\d\d characters\)"):
        parse_row({"query": "q", "response": "r", "images": [long_path]}, "x", 3, data)
