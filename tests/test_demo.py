"""Demo dataset generator and the generated tiny tokenizer."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vltrain.data.demo import (
    BACKGROUND,
    COLOURS,
    IMAGE_TAG,
    SHAPES,
    answer_vocabulary,
    demo_texts,
    majority_baseline,
    question_text,
    write_demo_dataset,
)
from vltrain.model.vocab import EMBEDDED_TOKENIZER

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, N_VAL = 400, 80
SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
]


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    split = write_demo_dataset(root, n_train=N_TRAIN, n_val=N_VAL, seed=0)
    return root, split, read(split.train), read(split.val)


# ---------------------------------------------------------------- pixels


def shape_mask(image: Image.Image) -> np.ndarray:
    return np.any(np.asarray(image.convert("RGB")) != np.array(BACKGROUND), axis=-1)


def colour_of(pixels: np.ndarray) -> str:
    values, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    dominant = tuple(int(v) for v in values[counts.argmax()])
    return min(COLOURS, key=lambda name: sum((a - b) ** 2 for a, b in zip(COLOURS[name], dominant)))


def kind_of(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    # square ~1.0, circle ~pi/4, triangle ~0.5
    return "square" if fill > 0.92 else "circle" if fill > 0.65 else "triangle"


def blobs(mask: np.ndarray) -> list[tuple[slice, slice]]:
    """Bounding boxes of the connected shapes (labelled at half resolution; shapes never touch)."""
    small = mask[::2, ::2]
    seen = np.zeros_like(small)
    boxes = []
    for start in zip(*np.nonzero(small)):
        if seen[start]:
            continue
        seen[start] = True
        stack, ys, xs = [start], [], []
        while stack:
            y, x = stack.pop()
            ys.append(y)
            xs.append(x)
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < small.shape[0] and 0 <= nx < small.shape[1] and small[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        boxes.append((
            slice(max(0, 2 * min(ys) - 2), 2 * max(ys) + 3),
            slice(max(0, 2 * min(xs) - 2), 2 * max(xs) + 3),
        ))
    return boxes


def analyse(image: Image.Image) -> tuple[list[tuple[str, str, tuple[slice, slice]]], tuple[int, int]]:
    """(kind, colour, box) of every shape in the image, and the image's (height, width)."""
    rgb = np.asarray(image.convert("RGB"))
    mask = shape_mask(image)
    return [(kind_of(mask[box]), colour_of(rgb[box][mask[box]]), box) for box in blobs(mask)], mask.shape


def check_answer(scene, question: str, answer: str) -> None:
    shapes, (h, w) = scene
    q = question_text(question)
    if q.startswith(("What colour is the shape", "What is the colour")):
        assert len(shapes) == 1 and shapes[0][1] == answer
    elif q.startswith(("What shape", "Which shape is shown")):
        assert len(shapes) == 1 and shapes[0][0] == answer
    elif q.startswith("How many shapes"):
        assert str(len(shapes)) == answer
    elif q.startswith("Is the "):
        named = [box for kind, _, box in shapes if kind == q.split()[2]]
        assert len(shapes) == 2 and len(named) == 1
        ys, xs = named[0]
        if "left" in q:
            assert answer == ("left" if (xs.start + xs.stop) / 2 < w / 2 else "right")
        else:
            assert answer == ("top" if (ys.start + ys.stop) / 2 < h / 2 else "bottom")
    elif q.startswith("What colour is the "):
        named = [colour for kind, colour, _ in shapes if kind == q.split()[-1].rstrip("?")]
        assert named == [answer]
    else:
        raise AssertionError(f"unexpected question {q!r}")


# ---------------------------------------------------------------- dataset


def test_deterministic(demo, tmp_path):
    root, *_ = demo
    again = tmp_path / "again"
    write_demo_dataset(again, n_train=N_TRAIN, n_val=N_VAL, seed=0)
    assert tree_digest(again) == tree_digest(root)
    other = tmp_path / "other"
    write_demo_dataset(other, n_train=N_TRAIN, n_val=N_VAL, seed=1)
    assert (other / "train.jsonl").read_bytes() != (root / "train.jsonl").read_bytes()


def test_idempotent_and_regenerates_on_change(tmp_path):
    root = tmp_path / "d"
    split = write_demo_dataset(root, n_train=60, n_val=20)
    files = [p for p in root.rglob("*") if p.is_file()]
    before = {p: p.stat().st_mtime_ns for p in files}
    assert write_demo_dataset(root, n_train=60, n_val=20) == split
    assert {p: p.stat().st_mtime_ns for p in files} == before

    write_demo_dataset(root, n_train=40, n_val=10)
    train, val = read(split.train), read(split.val)
    assert (len(train), len(val)) == (40, 10)
    on_disk = {p.name for p in (root / "images").iterdir()}
    referenced = {Path(i).name for r in train + val for i in r["images"]}
    assert on_disk == referenced  # stale images from the larger run are gone


def test_record_format(demo):
    root, split, train, val = demo
    assert (len(train), len(val)) == (N_TRAIN, N_VAL)
    for record in train + val:
        assert list(record) == ["query", "response", "history", "images"]
        assert isinstance(record["query"], str) and isinstance(record["response"], str)
        assert all(isinstance(turn, list) and len(turn) == 2 for turn in record["history"])
        assert len(record["images"]) <= 1
        for image in record["images"]:
            assert not Path(image).is_absolute()
            assert (split.train.parent / image).is_file()
        queries = [q for q, _ in record["history"]] + [record["query"]]
        # A tag, if any, sits at the start of the first round only.
        assert all(IMAGE_TAG not in q for q in queries[1:])
        if IMAGE_TAG in queries[0]:
            assert queries[0].startswith(IMAGE_TAG + "\n") and record["images"]
        if not record["images"]:
            assert record["history"] == []
        answers = [a for _, a in record["history"]] + [record["response"]]
        assert set(answers) <= set(answer_vocabulary())
        assert all(len(a.split()) <= 2 for a in answers)


def test_answers_match_pixels(demo):
    root, split, train, val = demo
    checked = Counter()
    for record in train[:150] + val[:50]:
        if not record["images"]:
            continue
        scene = analyse(Image.open(split.train.parent / record["images"][0]))
        for question, answer in record["history"] + [[record["query"], record["response"]]]:
            check_answer(scene, question, answer)
            checked[question_text(question).split()[0]] += 1
    assert checked["What"] and checked["How"] and checked["Is"] and checked["Which"]


def test_splits_disjoint(demo):
    root, split, train, val = demo
    paths = [{i for r in rows for i in r["images"]} for rows in (train, val)]
    assert not paths[0] & paths[1]
    pixels = [{hashlib.sha256(Image.open(root / i).tobytes()).digest() for i in p} for p in paths]
    assert not pixels[0] & pixels[1]


def test_proportions(demo):
    _, _, train, _ = demo
    n = len(train)
    image_records = [r for r in train if r["images"]]
    multi = sum(bool(r["history"]) for r in train) / n
    text_only = (n - len(image_records)) / n
    tagged = sum(IMAGE_TAG in (r["history"][0][0] if r["history"] else r["query"]) for r in image_records)
    assert abs(multi - 0.15) < 0.02
    assert abs(text_only - 0.05) < 0.01
    assert abs(tagged / len(image_records) - 0.2) < 0.02
    assert all(1 <= len(r["history"]) <= 2 for r in train if r["history"])
    kinds = Counter(question_text(r["query"]).split()[0] for r in image_records)
    assert kinds["Is"] > 0.15 * len(image_records)  # position questions
    answers = Counter(r["response"] for r in image_records)
    assert set(COLOURS) | set(SHAPES) | {"1", "2", "3", "left", "right", "top", "bottom"} <= set(answers)


def test_majority_baseline(demo, tmp_path):
    _, split, _, _ = demo
    own = majority_baseline(split.val)
    fitted = majority_baseline(split.val, split.train)
    assert 0.25 < fitted <= own < 0.7
    constant = tmp_path / "c.jsonl"
    constant.write_text(
        "\n".join(json.dumps({"query": q, "response": "red", "history": [], "images": []}) for q in "ab") + "\n"
    )
    assert majority_baseline(constant) == 1.0


def test_make_demo_data_cli(tmp_path):
    out = tmp_path / "cli"
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_demo_data.py"), "--out", str(out),
         "--n-train", "30", "--n-val", "10", "--seed", "3"],
        check=True, capture_output=True,
    )
    assert len(read(out / "train.jsonl")) == 30 and len(read(out / "val.jsonl")) == 10


# ---------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(EMBEDDED_TOKENIZER), local_files_only=True)


def test_tokenizer_special_ids(tokenizer):
    from transformers import PreTrainedTokenizerFast

    base = len(tokenizer) - len(SPECIALS)
    assert 1000 <= len(tokenizer) <= 2000
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIALS] == list(range(base, base + len(SPECIALS)))
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None
    fast = PreTrainedTokenizerFast.from_pretrained(str(EMBEDDED_TOKENIZER), local_files_only=True)
    assert fast.convert_tokens_to_ids(SPECIALS) == tokenizer.convert_tokens_to_ids(SPECIALS)


def test_tokenizer_encodes_chat(tokenizer):
    text = "<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nWhat colour is the shape?<|im_end|>"
    ids = tokenizer(text)["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[:7] == ["<|im_start|>", "user", "Ċ", "<img>", "<IMG_CONTEXT>", "<IMG_CONTEXT>", "</img>"]
    assert tokens[-1] == "<|im_end|>"
    assert tokenizer("\n")["input_ids"] == [tokenizer.convert_tokens_to_ids("Ċ")]
    for role in ("system", "user", "assistant"):
        assert len(tokenizer(role)["input_ids"]) == 1
    for answer in answer_vocabulary():
        assert len(tokenizer(answer)["input_ids"]) == 1  # no BOS, and short answers stay one token


def test_tokenizer_round_trips(tokenizer):
    texts = demo_texts() + [
        "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。",
        "You are an AI assistant whose name is InternLM (书生·浦语).",
        "Arbitrary text: ünïcödé, emoji 🙂, tabs\tand 12345.",
    ]
    for text in texts:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_tokenizer_reproducible(tmp_path):
    files = sorted(p.name for p in EMBEDDED_TOKENIZER.iterdir() if p.is_file())
    assert "tokenizer.json" in files and "tokenizer_config.json" in files
    assert sum((EMBEDDED_TOKENIZER / f).stat().st_size for f in files) < 300_000
    out = tmp_path / "tok"
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_tiny_tokenizer.py"), "--out", str(out)],
        check=True, capture_output=True,
    )
    assert sorted(p.name for p in out.iterdir()) == files
    for name in files:
        assert (out / name).read_bytes() == (EMBEDDED_TOKENIZER / name).read_bytes(), name
