"""The data check: every bad row found with its file, line and field before training; summary numbers; what the
model sees (show, dump, tiles_png); `data.on_error` raise vs skip in training."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from vltrain.cli.check import main
from vltrain.config import compose_config
from vltrain.data.check import SKIPPED_ROWS, DataError, check_records, check_splits, enforce
from vltrain.data.encode import IGNORE_INDEX
from vltrain.data.inspect import render_plain, render_rich, tiles_grid, token_runs
from vltrain.data.records import RecordError
from vltrain.data.specs import load_splits
from vltrain.data.tiling import image_to_pixel_values
from vltrain.model.load import make_encoder

REPO = Path(__file__).resolve().parent.parent


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# One file holding every kind of bad row between good ones: (row, expected field, words of the message).
# None as field: a good row.
def _corpus_rows():
    return [
        ({"query": "fine", "response": "yes", "images": ["ok.png"]}, None, ""),
        ('{"query": "broken json", "response": ', "json", "invalid JSON"),
        ({"query": 5, "response": "x"}, "query", "expected a string"),
        ({"query": "q", "response": "x", "images": ["missing.png"]}, "images[0]", "not found"),
        ({"query": "q", "response": "x", "images": ["corrupt.png"]}, "images[0]", "corrupt.png"),
        ({"query": "q", "response": "x", "images": ["truncated.png"]}, "images[0]", "truncated"),
        ({"query": "q", "response": "x", "images": ["truncated.jpg"]}, "images[0]", "truncated"),
        ({"query": "<image> and <image>", "response": "x", "images": ["ok.png"]}, "images", "2 <image> tags"),
        ({"query": "Find <ref-object>", "response": "<bbox>", "images": ["ok.png"],
          "objects": [{"caption": "dog", "bbox": [50, 10, 20, 30]}]}, "objects[0].bbox", "inverted"),
        ({"query": "Find <ref-object>", "response": "<bbox>", "images": ["ok.png"],
          "objects": [{"caption": "dog", "bbox": [10, 10, 700, 30]}]}, "objects[0].bbox", "outside"),
        ({"query": "long " * 600, "response": "x"}, "length", "exceed data.max_length=512"),
        ({"query": "q", "response": "   "}, "response", "empty"),
        ({"query": "q", "response": "x", "videos": ["clip.mp4"]}, "videos[0]", "clip.mp4"),
        ({"query": "fine too", "response": "yes"}, None, ""),
        ({"query": "q", "response": "x", "images": ["ok.png"], "extra": 1}, "extra", "unknown field"),
        ({"query": "q", "response": "<image> here", "images": ["ok.png"]}, "response", "belong in queries"),
        ({"query": "Where?", "response": "left", "history": [["<image>\nWhat?", "a square"]], "images": ["ok.png"]},
         None, ""),
        # the other two formats: fields named as the row writes them
        ({"messages": [{"role": "user", "content": "Find <ref-object>"}, {"role": "assistant", "content": "<bbox>"}],
          "images": ["ok.png"], "objects": [{"caption": "dog", "bbox": [10, 10, 20, 500]}]},
         "objects[0].bbox", "outside the 600x400 image"),
        ({"image": "truncated.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                      {"from": "gpt", "value": "Noise."}]}, "image", "truncated"),
        ({"conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]},
         "images", "1 <image> tag in the queries but 0 images"),
    ]


@pytest.fixture()
def corpus(tmp_path) -> tuple[Path, dict[int, tuple[str, str]]]:
    folder = tmp_path / "corpus"
    folder.mkdir()
    Image.new("RGB", (600, 400), "red").save(folder / "ok.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    png = io.BytesIO()
    Image.effect_noise((900, 300), 40).convert("RGB").save(png, "PNG")
    (folder / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    jpeg = io.BytesIO()
    Image.effect_noise((800, 800), 50).convert("RGB").save(jpeg, "JPEG")
    (folder / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 3])
    (folder / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"not a video" * 50)
    rows = _corpus_rows()
    path = write_jsonl(folder / "data.jsonl", [r for r, _, _ in rows])
    expected = {line: (f, words) for line, (_, f, words) in enumerate(rows, start=1) if f is not None}
    return path, expected


def overrides(train: Path, *extra: str) -> list[str]:
    return ["dataset=custom", f"dataset.train=[{train}]", "dataset.val_ratio=0", "data.max_length=512", *extra]


def test_every_malformed_row_is_reported_on_its_line(corpus):
    path, expected = corpus
    cfg = compose_config(overrides(path))
    errors: list[RecordError] = []
    train, val = load_splits(cfg.dataset, errors=errors)
    report = check_splits({"train": train, "val": val}, make_encoder(cfg), read_errors=errors)
    got = {p.line: p for p in report.problems}
    assert sorted(got) == sorted(expected), report.format()
    for line, (field_name, words) in expected.items():
        problem = got[line]
        assert problem.source == str(path) and problem.field == field_name, problem
        assert words in problem.message, problem
        assert str(problem).startswith(f"{path}:{line}: {field_name}: ")
    assert not report.ok and report.bad_rows() == {(str(path), line) for line in expected}
    assert report.splits["train"].rows == len(train) and report.splits["train"].failed == len(train) - 3
    assert len(train) + len(errors) == len(_corpus_rows())
    assert report.splits["train"].over_length == 1


def test_skip_keeps_the_good_rows_of_a_compact_json_array(tmp_path):
    """Rows of `json.dump(rows)` all start on line 1: bad ones are listed one by one and only they are left out."""
    rows = [{"query": "a", "response": "one"}, {"query": "b", "response": ""}, {"query": "c", "response": "two"},
            {"query": "<image>", "response": "three"}, {"query": "x " * 600, "response": "long"},
            {"query": "d", "response": "four"}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    cfg = compose_config(["dataset=custom", f"dataset.train=[{path}]", "dataset.val_ratio=0", "data.max_length=512"])
    errors: list[RecordError] = []
    train, val = load_splits(cfg.dataset, errors=errors)
    report = check_splits({"train": train, "val": val}, make_encoder(cfg), read_errors=errors)
    assert [str(p).split(": ")[1] for p in report.problems] == ["[1].response", "[3].images", "[4].length"]
    assert all(str(p).startswith(f"{path}:1: ") for p in report.problems)
    bad = enforce(report, "skip", tmp_path)
    assert [r.response for r in train if r.key not in bad] == ["one", "two", "four"]
    skipped = [json.loads(line) for line in (tmp_path / SKIPPED_ROWS).read_text().splitlines()]
    assert [(s["line"], s["row"], s["field"]) for s in skipped] == [(1, 2, "[1].response"), (1, 4, "[3].images"),
                                                                   (1, 5, "[4].length")]


@pytest.fixture()
def good(tmp_path) -> tuple[Path, Path]:
    """train: text-only, a square image (1 tile), a 3:1 image (3 tiles + thumbnail); val: two images."""
    Image.new("RGB", (448, 448), (255, 0, 0)).save(tmp_path / "square.png")
    Image.new("RGB", (1344, 448), (0, 0, 255)).save(tmp_path / "wide.png")
    train = write_jsonl(tmp_path / "train.jsonl", [
        {"query": "hello", "response": "hi"},
        {"query": "colour?", "response": "red", "images": ["square.png"]},
        {"query": "colour?", "response": "blue", "history": [["<image>\nshape?", "a bar"]], "images": ["wide.png"]},
    ])
    val = write_jsonl(tmp_path / "val.jsonl", [
        {"query": "same?", "response": "no", "images": ["square.png", "wide.png"]},
    ])
    return train, val


def test_summary_numbers(good):
    train_path, val_path = good
    cfg = compose_config(["dataset=custom", f"dataset.train=[{train_path}]", f"dataset.val=[{val_path}]",
                          "model.max_tiles=6"])
    encoder = make_encoder(cfg)
    train, val = load_splits(cfg.dataset)
    report = check_splits({"train": train, "val": val}, encoder, num_proc=2)
    assert report.ok and report.problems == []
    t, v = report.splits["train"], report.splits["val"]
    assert (t.rows, t.images, t.videos, sorted(t.tiles)) == (3, 2, 0, [0, 1, 4])
    # val: budget 6 // 2 images = 3 tiles each: the square stays 1 tile, the 3:1 image becomes 3 + thumbnail.
    assert (v.rows, v.images, v.tiles) == (1, 2, [5])
    for stats, records in ((t, train), (v, val)):
        samples = [encoder(r) for r in records]
        assert stats.tokens == [len(s.input_ids) for s in samples]
        assert stats.trained == [int((s.labels != IGNORE_INDEX).sum()) for s in samples]
    text = report.format()
    assert "no problems" in text
    train_line = next(line for line in text.splitlines() if line.startswith("train"))
    tokens = sorted(t.tokens)
    assert "0 / 1 / 4" in train_line and f"{tokens[0]} / {tokens[1]} / {tokens[2]}" in train_line
    # A single-list check gives the same numbers.
    assert check_records(train, encoder).splits["records"].tokens == t.tokens


def test_show_dump_and_tiles_png(good, tmp_path, capsys):
    train_path, val_path = good
    dump, tiles = tmp_path / "dump.jsonl", tmp_path / "tiles"
    code = main(["dataset=custom", f"dataset.train=[{train_path}]", f"dataset.val=[{val_path}]", "show=3",
                 f"dump={dump}", f"tiles_png={tiles}"])
    out = capsys.readouterr().out
    assert code == 0, out
    # show: the 3 train records, trained text between « », image blocks collapsed to one token times N.
    assert out.count("--- train ") == 3 and "--- val " not in out
    assert "«hi<|im_end|>»" in out and "«red<|im_end|>»" in out and "«a bar<|im_end|>»" in out
    assert "<img><IMG_CONTEXT>*64</img>" in out and "<img><IMG_CONTEXT>*256</img>" in out  # 1 and 4 tiles
    assert "<|im_start|>user\nhello<|im_end|>" in out  # masked text shown unmarked
    # dump: every record, ids and labels exactly as encoded.
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert [(Path(r["source"]).name, r["line"], r["split"]) for r in rows] == \
        [("train.jsonl", 1, "train"), ("train.jsonl", 2, "train"), ("train.jsonl", 3, "train"), ("val.jsonl", 1, "val")]
    cfg = compose_config(["dataset=custom", f"dataset.train=[{train_path}]", f"dataset.val=[{val_path}]"])
    encoder = make_encoder(cfg)
    train, _ = load_splits(cfg.dataset)
    for row, record in zip(rows, train):
        sample = encoder(record)
        assert row["input_ids"] == sample.input_ids.tolist() and row["labels"] == sample.labels.tolist()
        assert row["tiles_per_image"] == sample.tiles_per_image
    # tiles_png: one grid per image of the shown records, colours de-normalised back to the source pixels.
    names = sorted(p.name for p in tiles.iterdir())
    assert names == ["train-train-line2-image0.png", "train-train-line3-image0.png"]
    with Image.open(tiles / names[1]) as grid:
        assert grid.size == (2 * 448 + 4, 2 * 448 + 4)  # 4 tiles in a 2 x 2 grid with a 4 px gap
        assert grid.getpixel((10, 10)) == (0, 0, 255) and grid.getpixel((448 + 2, 10)) == (255, 255, 255)


def test_render_marks_trained_tokens(good):
    train_path, _ = good
    cfg = compose_config(["dataset=custom", f"dataset.train=[{train_path}]", "dataset.val_ratio=0"])
    encoder = make_encoder(cfg)
    sample = encoder(load_splits(cfg.dataset)[0][1])
    runs = token_runs(encoder.tokenizer, sample.input_ids.tolist(), sample.labels.tolist())
    assert [k for k, _ in runs] == ["masked", "image", "masked", "trained"]
    assert runs[1][1] == "<IMG_CONTEXT>*64" and runs[3][1] == "red<|im_end|>"
    assert render_plain(runs).endswith("<|im_start|>assistant\n«red<|im_end|>»")
    text = render_rich(runs)
    assert text.plain == "".join(t for _, t in runs)
    assert [(text.plain[s.start:s.end], s.style) for s in text.spans][-1] == ("red<|im_end|>", "bold green")


def test_tiles_grid_round_trips_pixels():
    image = Image.effect_noise((448, 448), 60).convert("RGB")
    grid = tiles_grid(image_to_pixel_values(image, max_tiles=1))
    assert grid.size == (448, 448) and list(grid.getdata()) == list(image.getdata())


@pytest.mark.slow
def test_command_line_exit_codes(corpus, good, tmp_path):
    path, expected = corpus
    out = subprocess.run([sys.executable, "-m", "vltrain.check", *overrides(path), "data.num_proc=2"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 1, out.stderr[-2000:]
    for line, (field_name, _) in expected.items():
        assert f"{path}:{line}: {field_name}: " in out.stdout
    assert f"{len(expected)} problems:" in out.stdout
    # Good data: 0; a misspelt key: 2 with the suggestion (both in-process).
    train_path, val_path = good
    assert main(["dataset=custom", f"dataset.train=[{train_path}]", f"dataset.val=[{val_path}]"]) == 0
    assert main(["dataset=custom", f"dataset.train=[{train_path}]", "shwo=3"]) == 2


# ---- training: data.on_error --------------------------------------------------------------------------------


def train_config(tmp_path: Path, train: Path, *extra: str):
    return compose_config([
        *overrides(train, *extra), "eval.generate_samples=0", "global_batch_size=2", "trainer.max_steps=1",
        "trainer.per_device_train_batch_size=2", "trainer.dataloader_num_workers=0", "trainer.eval_strategy=no",
    ], run_dir=str(tmp_path / "run"))


def test_on_error_raise_lists_every_problem_before_the_model_loads(corpus, tmp_path, monkeypatch):
    from vltrain.train import recipe

    path, expected = corpus
    monkeypatch.setattr(recipe, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    with pytest.raises(DataError) as info:
        recipe.build_trainer(train_config(tmp_path, path))
    message = str(info.value)
    assert f"{len(expected)} bad row(s)" in message and "data.on_error=skip" in message
    for line, (field_name, _) in expected.items():
        assert f"{path}:{line}: {field_name}: " in message


@pytest.mark.parametrize("encode", ["lazy", "datasets"])
def test_on_error_skip_leaves_out_and_lists_bad_rows(corpus, tmp_path, encode):
    from vltrain.train.recipe import build_trainer

    path, expected = corpus
    cfg = train_config(tmp_path, path, "data.on_error=skip", f"data.encode={encode}",
                       f"data.encode_cache={tmp_path / 'encoded'}")
    trainer = build_trainer(cfg)
    assert len(trainer.train_dataset) == 3  # the three good rows, nothing substituted
    assert trainer.train_dataset.where == [f"{path}:1", f"{path}:14", f"{path}:17"]
    skipped = [json.loads(line) for line in (Path(cfg.run_dir) / SKIPPED_ROWS).read_text().splitlines()]
    assert [(s["line"], s["field"]) for s in skipped] == [(line, f) for line, (f, _) in sorted(expected.items())]
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 2 and all(n >= 0 for n in batch["tiles_per_sample"])


def test_hub_dataset_offline_is_one_clear_error(monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = compose_config(["dataset=coco-en-2-mini"])
    assert cfg.dataset.train == ["coco-en-2-mini"] and cfg.dataset.val_ratio == 0.01
    assert main(["dataset=coco-en-2-mini", 'dataset.train=["coco-en-2-mini#100"]']) == 2
    err = capsys.readouterr().err
    assert err.startswith("vltrain.check: dataset.train[0]: coco-en-2-mini: needs the Hugging Face Hub")
    assert "Traceback" not in err


def test_check_progress_on_a_non_terminal_stream_is_plain_periodic_lines(good, monkeypatch, capsys):
    """A log file or pipe gets one line per interval (count, rate, ETA), never a carriage return."""
    from vltrain.data import check as check_module

    monkeypatch.setattr(check_module, "PROGRESS_INTERVAL", 0.0)  # a line after every record
    train_path, _ = good
    cfg = compose_config(["dataset=custom", f"dataset.train=[{train_path}]", "dataset.val_ratio=0"])
    records, _ = load_splits(cfg.dataset)
    check_module.check_records(records, make_encoder(cfg))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("data check: ")]
    assert "\r" not in err
    assert len(lines) == len(records)
    assert lines[0].startswith(f"data check: 1/{len(records)} records") and "records/s" in lines[0]
    assert "ETA" in lines[0] and f"{len(records)}/{len(records)} records (100%)" in lines[-1]
