"""Dataset specs (`path#N`, hub names), mixing, the held-out split, and `data.encode=datasets` giving the same
samples as lazy encoding."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vltrain.config import ConfigError, DatasetConfig
from vltrain.data import encode_cache as cache_module
from vltrain.data import specs
from vltrain.data.dataset import EncodedDataset, PreEncodedDataset
from vltrain.data.encode import Encoder
from vltrain.data.encode_cache import encode_with_datasets
from vltrain.data.records import RecordError
from vltrain.data.specs import HubUnavailable, load_splits, read_spec
from vltrain.data.tiling import IMAGENET_MEAN, IMAGENET_STD, denormalise, normalise


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def numbered(tmp_path) -> Path:
    """10 text rows whose response is their index."""
    return write_jsonl(tmp_path / "numbered.jsonl", [{"query": f"q{i}", "response": str(i)} for i in range(10)])


def responses(records) -> list[str]:
    return [r.response for r in records]


def test_spec_without_n_reads_every_row_in_order(numbered):
    assert responses(read_spec(str(numbered), seed=0)) == [str(i) for i in range(10)]


def test_spec_n_below_size_samples_distinct_rows_reproducibly(numbered):
    picked = responses(read_spec(f"{numbered}#4", seed=1))
    assert len(picked) == 4 and len(set(picked)) == 4
    assert picked == responses(read_spec(f"{numbered}#4", seed=1))
    others = [responses(read_spec(f"{numbered}#4", seed=s)) for s in range(2, 8)]
    assert any(o != picked for o in others)  # the seed matters


def test_spec_n_samples_the_same_rows_from_a_relative_or_absolute_path(numbered, monkeypatch):
    """A run's saved config holds absolute specs (`absolute_spec`); they must select the rows the run used."""
    monkeypatch.chdir(numbered.parent)
    relative = responses(read_spec("numbered.jsonl#4", seed=1))
    assert specs.absolute_spec("numbered.jsonl#4") == f"{numbered}#4"
    assert responses(read_spec(specs.absolute_spec("numbered.jsonl#4"), seed=1)) == relative
    for hub_spec in ("coco-en-2-mini", "coco-en-2-mini#100", "HF::coco-en-2-mini#5", "MS::coco-en-2"):
        assert specs.absolute_spec(hub_spec) == hub_spec


def test_spec_n_above_size_repeats_every_row(numbered):
    picked = responses(read_spec(f"{numbered}#25", seed=0))
    counts = {r: picked.count(r) for r in set(picked)}
    assert len(picked) == 25 and set(counts) == {str(i) for i in range(10)}
    assert sorted(counts.values()) == [2] * 5 + [3] * 5  # 2 full passes, then 5 distinct rows once more


def test_mixing_specs_concatenates_in_order(tmp_path, numbered):
    letters = write_jsonl(tmp_path / "letters.jsonl", [{"query": "q", "response": c} for c in "abc"])
    cfg = DatasetConfig(train=[f"{numbered}#3", str(letters), f"{letters}#5"], val_ratio=0.0)
    train, val = load_splits(cfg)
    got = responses(train)
    assert len(got) == 3 + 3 + 5 and val == []
    assert set(got[:3]) <= {str(i) for i in range(10)}
    assert got[3:6] == ["a", "b", "c"] and sorted(set(got[6:])) == ["a", "b", "c"]


def test_val_ratio_split_is_disjoint_and_reproducible(numbered, tmp_path):
    cfg = DatasetConfig(train=[str(numbered)], val_ratio=0.3, seed=5)
    train, val = load_splits(cfg)
    assert len(val) == 3 and len(train) == 7
    assert sorted(responses(train) + responses(val), key=int) == [str(i) for i in range(10)]
    again_train, again_val = load_splits(cfg)
    assert responses(again_val) == responses(val) and responses(again_train) == responses(train)
    other = load_splits(DatasetConfig(train=[str(numbered)], val_ratio=0.3, seed=6))[1]
    assert responses(other) != responses(val)  # another seed holds out other rows
    # An explicit val list wins over the ratio.
    held = write_jsonl(tmp_path / "held.jsonl", [{"query": "q", "response": "held"}])
    train, val = load_splits(DatasetConfig(train=[str(numbered)], val=[str(held)], val_ratio=0.3))
    assert len(train) == 10 and responses(val) == ["held"]


def test_bad_rows_are_collected_with_an_errors_list(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"query": "q", "response": "a"}\nnot json\n{"query": "q", "response": ""}\n', encoding="utf-8")
    errors: list[RecordError] = []
    train, _ = load_splits(DatasetConfig(train=[str(path)], val_ratio=0.0), errors=errors)
    assert responses(train) == ["a"]
    assert [(e.line, e.field) for e in errors] == [(2, "json"), (3, "response")]
    with pytest.raises(ConfigError, match=r"dataset.train\[0\]: .*mixed.jsonl:2: json"):
        load_splits(DatasetConfig(train=[str(path)], val_ratio=0.0))  # no errors list: the first one stops


def test_missing_file_and_unknown_name_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"dataset.train\[0\]: 'nope.jsonl': dataset file not found"):
        load_splits(DatasetConfig(train=["nope.jsonl"]))
    with pytest.raises(ConfigError, match="known dataset names: coco-en-2-mini"):
        load_splits(DatasetConfig(train=["coco-en-3"]))
    with pytest.raises(ConfigError, match="unknown hub dataset"):
        load_splits(DatasetConfig(train=["HF::coco-en-3"]))


def test_hub_name_offline_fails_at_once(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnavailable, match=r"dataset.train\[0\]: coco-en-2-mini: needs the Hugging Face Hub "
                                             r"\(lmms-lab/COCO-Caption\), but HF_HUB_OFFLINE"):
        load_splits(DatasetConfig(train=["coco-en-2-mini#10"]), cache_dir=tmp_path)


def test_hub_name_unreachable_fails_in_seconds(tmp_path, numbered, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    with pytest.raises(HubUnavailable, match=r"dataset.train\[1\]: coco-en-2-mini: .*cannot be reached"):
        load_splits(DatasetConfig(train=[str(numbered), "coco-en-2-mini"]), cache_dir=tmp_path)


def test_hub_without_a_copy_on_that_hub_says_which_to_use(tmp_path, monkeypatch):
    with pytest.raises(HubUnavailable, match="no Hugging Face copy is known; use MS::coco-en-2"):
        read_spec("HF::coco-en-2", seed=0, cache_dir=tmp_path)
    monkeypatch.setitem(sys.modules, "modelscope", None)  # as when it is not installed
    with pytest.raises(HubUnavailable, match=r"MS:: needs the modelscope package \(pip install modelscope\)"):
        read_spec("MS::coco-en-2-mini#5", seed=0, cache_dir=tmp_path)


def _fake_hub_rows(n: int):
    import datasets

    def png(i):
        buffer = io.BytesIO()
        Image.new("RGB", (40 + i, 30), (i * 20, 0, 0)).save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    return datasets.Dataset.from_dict({"image": [png(i) for i in range(n)],
                                       "answer": [[f"caption {i}", "another"] for i in range(n)]})


def test_hub_rows_become_a_jsonl_with_image_files_and_are_reused_offline(tmp_path, monkeypatch):
    calls = []

    def fetch(name, entry, hub):
        calls.append((name, hub))
        return _fake_hub_rows(6)

    monkeypatch.setattr(specs, "_fetch_hub_rows", fetch)
    records = read_spec("coco-en-2-mini#4", seed=3, cache_dir=tmp_path)
    assert calls == [("coco-en-2-mini", "HF")]
    assert len(records) == 4 and len({r.response for r in records}) == 4
    for r in records:
        assert r.query == "please describe the image." and r.response.startswith("caption ")
        index = int(r.response.split()[1])
        with Image.open(r.images[0]) as image:
            assert image.size == (40 + index, 30)  # the row's own image, saved as a file
        assert r.source.endswith("rows-4-seed3.jsonl")
    # Cached: no fetch the second time (offline works), same rows.
    monkeypatch.setattr(specs, "_fetch_hub_rows", lambda *a: pytest.fail("fetched again"))
    assert [r.response for r in read_spec("coco-en-2-mini#4", seed=3, cache_dir=tmp_path)] == \
        [r.response for r in records]


def test_caption_rules():
    assert specs._caption("a dog&&two dogs") == "a dog"
    assert specs._caption(["first", "second"]) == "first"


# ---- lazy vs datasets -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder(tokenizer):
    return Encoder(tokenizer, "Hermes-2", None, max_tiles=6, max_length=4096, image_tokens_per_tile=4)


@pytest.fixture()
def mixed(tmp_path) -> list:
    """Text-only, one image, two images, multi-turn, a tagged image, an RGBA and a grey image, an image that
    does not decode."""
    Image.new("RGB", (448, 448), (200, 10, 10)).save(tmp_path / "square.png")
    Image.effect_noise((1000, 400), 60).convert("RGB").save(tmp_path / "wide.jpg")
    Image.new("RGBA", (300, 700), (0, 90, 200, 128)).save(tmp_path / "tall.png")
    Image.effect_noise((900, 900), 30).save(tmp_path / "grey.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG but not really")
    rows = [
        {"query": "hello", "response": "hi"},
        {"query": "colour?", "response": "red", "images": ["square.png"]},
        {"query": "compare", "response": "different", "images": ["wide.jpg", "tall.png"]},
        {"query": "and now?", "response": "still", "history": [["<image>\nwhat?", "noise"]], "images": ["grey.png"]},
        {"query": "Look: <image> here", "response": "ok", "system": "Be brief.", "images": ["wide.jpg"]},
        {"query": "what?", "response": "nothing", "images": ["broken.png"]},
    ]
    errors: list[RecordError] = []
    records = read_spec(str(write_jsonl(tmp_path / "mixed.jsonl", rows)), seed=0, errors=errors)
    assert errors == []
    return records


def test_datasets_encoding_gives_identical_samples(tmp_path, encoder, mixed):
    records = mixed
    assert len(records) == 6
    encoded = encode_with_datasets(records, encoder, tmp_path / "cache", num_proc=2)
    assert len(encoded) == len(records)
    lazy = EncodedDataset(records, encoder)
    good = [i for i in range(len(records)) if not encoded[i]["error"]]
    assert good == [0, 1, 2, 3, 4]  # the row whose image does not decode failed, with its location
    error = cache_module.row_error(encoded[5])
    assert (Path(error.source).name, error.line, error.row, error.field) == ("mixed.jsonl", 6, 6, "images[0]")
    up_front = PreEncodedDataset(encoded, good)
    for k, i in enumerate(good):
        a, b = lazy[i], up_front[k]
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
        assert a.tiles_per_image == b.tiles_per_image
        if a.pixel_values is None:
            assert b.pixel_values is None
        else:
            assert a.pixel_values.dtype == b.pixel_values.dtype and torch.equal(a.pixel_values, b.pixel_values)
    tiles = [lazy[i].tiles_per_image for i in good]
    assert sum(len(t) for t in tiles) == 5 and max(max(t, default=0) for t in tiles) > 1  # multi-tile images too


def test_cache_rows_read_back_from_any_position_of_a_record_batch(encoder, mixed):
    """The cache is written one row per record batch, but a row must read back right from a batch of several
    (a list column's slice, not the whole batch's values)."""
    import datasets
    import pyarrow as pa

    records = mixed[:5]
    table = pa.concat_tables([cache_module.row_table(cache_module.encode_row(encoder, r)) for r in records]).combine_chunks()
    assert table.column("input_ids").num_chunks == 1
    served = PreEncodedDataset(datasets.Dataset(table))
    for i, record in enumerate(records):
        expected, sample = encoder(record, normalise=False), served[i]
        assert torch.equal(sample.input_ids, expected.input_ids) and torch.equal(sample.labels, expected.labels)
        assert sample.tiles_per_image == expected.tiles_per_image
        assert (sample.pixel_values is None) == (expected.pixel_values is None)
        if expected.pixel_values is not None:
            assert torch.equal(sample.pixel_values, expected.pixel_values)


def entries(cache: Path) -> list[Path]:
    """Complete entries of the encoded cache (one folder per fingerprint)."""
    return [p for p in cache.iterdir() if (p / "complete.json").is_file()]


def test_datasets_cache_is_reused_and_keyed_by_media(tmp_path, encoder, mixed, monkeypatch):
    records = mixed[:3]
    cache = tmp_path / "cache"
    first = encode_with_datasets(records, encoder, cache)
    assert len(entries(cache)) == 1
    with monkeypatch.context() as patch:
        patch.setattr(cache_module, "encode_row", lambda *a: pytest.fail("encoded again"))
        again = encode_with_datasets(records, encoder, cache)
    assert again[2]["input_ids"] == first[2]["input_ids"]
    assert len(entries(cache)) == 1
    # Another encoder setting is another entry.
    other = Encoder(encoder.tokenizer, "Hermes-2", None, max_tiles=2, max_length=4096, image_tokens_per_tile=4)
    with monkeypatch.context() as patch:
        patch.setattr(cache_module, "encode_row", lambda *a: pytest.fail("encoded again"))
        with pytest.raises(pytest.fail.Exception, match="encoded again"):
            encode_with_datasets(records, other, cache)
    assert len(entries(cache)) == 1  # the failed encoding left nothing behind
    # Rewriting an image changes the fingerprint: encoded again, into a second entry.
    Image.new("RGB", (448, 448), (0, 200, 0)).save(Path(records[1].images[0]))
    encode_with_datasets(records, encoder, cache)
    assert len(entries(cache)) == 2


def test_stored_uint8_tiles_give_the_same_floats(tmp_path, encoder, mixed):
    """The cache keeps tiles as uint8 (4x smaller than float32) and normalises them on reading with the lazy
    path's function; numpy's float cast in that function gives the bits of torch's (every uint8 value checked)."""
    every_value = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16).repeat(3, axis=1)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    as_torch = torch.from_numpy(every_value).to(torch.float32).div_(255.0).sub_(mean).div_(std)  # ToTensor+Normalize
    assert torch.equal(normalise(every_value), as_torch)
    assert np.array_equal(denormalise(normalise(every_value)), every_value)

    encoded = encode_with_datasets(mixed[1:3], encoder, tmp_path / "cache")
    for record, row in zip(mixed[1:3], encoded):
        floats = encoder(record).pixel_values
        assert len(row["pixels"]) == floats.numel()  # one byte per value
        assert row["pixel_shape"] == list(floats.shape)
        raw = encoder(record, normalise=False).pixel_values
        assert raw.dtype == torch.uint8 and torch.equal(normalise(raw.numpy()), floats)


def test_spec_whose_rows_are_all_bad(tmp_path, caplog):
    """`path#N` with every row bad: with an errors list every row is reported and the spec gives no row (a
    warning says so); without, the first bad row is the error."""
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"query": "q", "response": ""}, {"query": 1, "response": "a"}])
    errors: list[RecordError] = []
    with caplog.at_level("WARNING", logger="vltrain.data.specs"):
        assert read_spec(f"{bad}#5", seed=0, errors=errors) == []
    assert [(e.line, e.field) for e in errors] == [(1, "response"), (2, "query")]
    assert "none of the rows of" in caplog.text and "#5" in caplog.text
    with pytest.raises(ConfigError, match=r"bad\.jsonl:1: response: empty response"):
        read_spec(f"{bad}#5", seed=0)
    with pytest.raises(ConfigError, match="#0 selects no rows"):
        read_spec(f"{bad}#0", seed=0)


def test_held_out_rows_are_never_trained_when_repeated(numbered):
    """`#N` repeats rows; the held-out split takes distinct rows, every copy on the same side."""
    train, val = load_splits(DatasetConfig(train=[f"{numbered}#30"], val_ratio=0.2, seed=3))
    assert len(val) == 2 and len({r.key for r in val}) == 2  # 20% of the 10 distinct rows, once each
    assert not {r.key for r in val} & {r.key for r in train}
    assert len(train) == 24  # the 8 other rows, 3 copies each
    assert load_splits(DatasetConfig(train=[f"{numbered}#30"], val_ratio=0.2, seed=3))[1] == val
