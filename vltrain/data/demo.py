"""Deterministic demo dataset of coloured shapes, for runs without downloads.

Each image is a plain white canvas with one to three flat-coloured shapes
(circle, square, triangle in red, green, blue or yellow), drawn without
anti-aliasing so every shape pixel is exactly a palette colour. Questions
ask for the colour or the shape (single-shape images), the number of shapes
(one to three), or where a named shape is (two different shapes, one in each
half of the image, along the axis the question names). Answers are a single
word, so greedy exact-match accuracy is a meaningful held-out metric.

Records use the ms-swift 2.x layout::

    {"query": ..., "response": ..., "history": [[q, a], ...], "images": [...]}

with image paths relative to the JSONL file. Roughly 15% of the records are
multi-turn (one or two earlier rounds about the same image), 5% are text-only
(small closed-form facts, ``images`` empty) and a fifth of the image records
put an explicit ``<image>`` tag in their first query; the rest leave the
placement of the image to the loader.

``write_demo_dataset`` writes ``images/``, ``train.jsonl`` and ``val.jsonl``
under a root folder; the same parameters give byte-identical files, and a
stamp file makes repeated calls with unchanged parameters free. Processes that
share a root (the ranks of a run) take a file lock: one writes, the others wait.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock
from PIL import Image, ImageDraw

from vltrain.data.records import IMAGE_TAG
from vltrain.files import write_atomic
from vltrain.progress import progress

__all__ = [
    "BACKGROUND",
    "COLOURS",
    "IMAGE_TAG",
    "SHAPES",
    "DemoSplit",
    "answer_vocabulary",
    "demo_texts",
    "majority_baseline",
    "question_text",
    "write_demo_dataset",
]

FORMAT_VERSION = 1
STAMP_NAME = "demo_stamp.json"

BACKGROUND = (255, 255, 255)
# Saturated and far apart in RGB, so colour is the easiest thing to learn.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (20, 160, 20),
    "blue": (30, 60, 220),
    "yellow": (240, 200, 0),
}
SHAPES = ("circle", "square", "triangle")

MULTI_TURN_FRACTION = 0.15
TEXT_ONLY_FRACTION = 0.05
TAGGED_FRACTION = 0.2  # of the image records

# Final-question mix of the image records; colour is the most common so the
# first thing a model learns already moves the metric.
QUESTION_MIX = (("colour", 0.35), ("shape", 0.2), ("count", 0.2), ("position", 0.25))

COLOUR_QUESTIONS = ("What colour is the shape?", "What is the colour of the shape?")
SHAPE_QUESTIONS = ("What shape is this?", "Which shape is shown?")
COUNT_QUESTIONS = ("How many shapes are there?", "How many shapes are in the image?")
NAMED_COLOUR_QUESTION = "What colour is the {shape}?"
POSITION_QUESTIONS = {
    "horizontal": "Is the {shape} on the left or the right?",
    "vertical": "Is the {shape} at the top or the bottom?",
}
POSITION_ANSWERS = {"horizontal": ("left", "right"), "vertical": ("top", "bottom")}


def _text_facts() -> list[tuple[str, str]]:
    facts = [
        (f"What is {a} plus {b}?", str(a + b)) for a in range(1, 5) for b in range(1, 5)
    ]
    facts += [
        ("How many sides does a triangle have?", "3"),
        ("How many sides does a square have?", "4"),
        ("Which shape has no corners?", "circle"),
        ("What colour is the sky?", "blue"),
        ("What colour is grass?", "green"),
        ("What colour is a banana?", "yellow"),
        ("What colour is a ripe tomato?", "red"),
    ]
    return facts


TEXT_FACTS = tuple(_text_facts())


@dataclass(frozen=True)
class DemoSplit:
    train: Path
    val: Path


@dataclass(frozen=True)
class _Shape:
    kind: str
    colour: str
    box: tuple[int, int, int, int]  # left, top, right, bottom (inclusive)


# ---------------------------------------------------------------- texts


def demo_texts() -> list[str]:
    """Every question and answer string the generator can emit, in a fixed order."""
    texts: list[str] = []
    texts += COLOUR_QUESTIONS + SHAPE_QUESTIONS + COUNT_QUESTIONS
    for shape in SHAPES:
        texts.append(NAMED_COLOUR_QUESTION.format(shape=shape))
        for axis in ("horizontal", "vertical"):
            texts.append(POSITION_QUESTIONS[axis].format(shape=shape))
    for question, _ in TEXT_FACTS:
        texts.append(question)
    texts += answer_vocabulary()
    return texts


def answer_vocabulary() -> list[str]:
    """All answers the generator can produce, sorted."""
    answers = set(COLOURS) | set(SHAPES) | {"1", "2", "3"}
    for pair in POSITION_ANSWERS.values():
        answers |= set(pair)
    answers |= {a for _, a in TEXT_FACTS}
    return sorted(answers)


def question_text(query: str) -> str:
    """A query with any ``<image>`` tag and surrounding whitespace removed."""
    return query.replace(IMAGE_TAG, "").strip()


# ---------------------------------------------------------------- scenes


Box = tuple[int, int, int, int]


def _place(rng: random.Random, region: Box, lo: int, hi: int) -> Box:
    """A square box of side in [lo, hi] inside region, with a small margin."""
    x0, y0, x1, y1 = region
    margin = max(2, (x1 - x0) // 20)
    hi = min(hi, x1 - x0 - 2 * margin, y1 - y0 - 2 * margin)
    side = rng.randint(min(lo, hi), hi)
    left = rng.randint(x0 + margin, x1 - margin - side)
    top = rng.randint(y0 + margin, y1 - margin - side)
    return (left, top, left + side - 1, top + side - 1)


def _scene(rng: random.Random, size: int, n: int, distinct: bool = False) -> tuple[list[_Shape], str | None]:
    """Shapes for an n-shape image; for two shapes also the axis that separates them."""
    axis = None
    kinds = rng.sample(SHAPES, n) if distinct else [rng.choice(SHAPES) for _ in range(n)]
    colours = [rng.choice(sorted(COLOURS)) for _ in range(n)]
    half = size // 2
    if n == 1:
        regions = [(0, 0, size, size)]
        lo, hi = int(size * 0.36), int(size * 0.6)
    elif n == 2:
        axis = rng.choice(("horizontal", "vertical"))
        if axis == "horizontal":
            regions = [(0, 0, half, size), (half, 0, size, size)]
        else:
            regions = [(0, 0, size, half), (0, half, size, size)]
        lo, hi = int(size * 0.22), int(size * 0.4)
    else:
        cells = [(0, 0, half, half), (half, 0, size, half), (0, half, half, size), (half, half, size, size)]
        regions = rng.sample(cells, 3)
        lo, hi = int(size * 0.2), int(size * 0.36)
    return [_Shape(k, c, _place(rng, r, lo, hi)) for k, c, r in zip(kinds, colours, regions)], axis


def _draw(shapes: list[_Shape], size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for s in shapes:
        fill = COLOURS[s.colour]
        left, top, right, bottom = s.box
        if s.kind == "circle":
            draw.ellipse(s.box, fill=fill)
        elif s.kind == "square":
            draw.rectangle(s.box, fill=fill)
        else:
            draw.polygon([((left + right) / 2, top), (left, bottom), (right, bottom)], fill=fill)
    return image


def _side(shape: _Shape, axis: str, size: int) -> str:
    left, top, right, bottom = shape.box
    centre = (left + right) / 2 if axis == "horizontal" else (top + bottom) / 2
    first, second = POSITION_ANSWERS[axis]
    return first if centre < size / 2 else second


def _question_pool(
    rng: random.Random, shapes: list[_Shape], axis: str | None, size: int
) -> list[tuple[str, str, str]]:
    """(kind, question, answer) triples that the scene answers unambiguously."""
    pool: list[tuple[str, str, str]] = [("count", rng.choice(COUNT_QUESTIONS), str(len(shapes)))]
    if len(shapes) == 1:
        pool.append(("colour", rng.choice(COLOUR_QUESTIONS), shapes[0].colour))
        pool.append(("shape", rng.choice(SHAPE_QUESTIONS), shapes[0].kind))
        return pool
    kinds = Counter(s.kind for s in shapes)
    for s in shapes:
        if kinds[s.kind] == 1:
            pool.append(("named_colour", NAMED_COLOUR_QUESTION.format(shape=s.kind), s.colour))
    if axis is not None and len(kinds) == 2:
        for s in shapes:
            pool.append(("position", POSITION_QUESTIONS[axis].format(shape=s.kind), _side(s, axis, size)))
    return pool


def _image_record(
    rng: random.Random, size: int, kind: str, rounds: int
) -> tuple[list[_Shape], list[tuple[str, str]]]:
    """Draw a scene for a final question of ``kind`` and pick ``rounds`` questions."""
    while True:
        if kind in ("colour", "shape"):
            shapes, axis = _scene(rng, size, 1)
        elif kind == "count":
            shapes, axis = _scene(rng, size, rng.randint(1, 3))
        else:
            shapes, axis = _scene(rng, size, 2, distinct=True)
        pool = _question_pool(rng, shapes, axis, size)
        finals = [p for p in pool if p[0] == kind]
        if not finals:
            continue
        final = rng.choice(finals)
        # The other shape's position would give the answer away.
        earlier = [p for p in pool if p[1] != final[1] and not (kind == "position" == p[0])]
        # A scene with too few distinct questions (e.g. three squares) is redrawn.
        if len(earlier) < rounds - 1:
            continue
        history = rng.sample(earlier, rounds - 1)
        return shapes, [(q, a) for _, q, a in history] + [(final[1], final[2])]


def _plan(rng: random.Random, n: int) -> list[tuple[str, int, bool]]:
    """Exact per-split counts of (final question kind, rounds, tagged), shuffled."""
    n_text = round(n * TEXT_ONLY_FRACTION)
    n_image = n - n_text
    n_multi = round(n * MULTI_TURN_FRACTION)
    n_tagged = round(n_image * TAGGED_FRACTION)
    kinds: list[str] = []
    for kind, share in QUESTION_MIX:
        kinds += [kind] * round(n_image * share)
    kinds = (kinds + [QUESTION_MIX[0][0]] * n_image)[:n_image]
    rng.shuffle(kinds)
    rounds = [rng.randint(2, 3) for _ in range(n_multi)] + [1] * (n_image - n_multi)
    rng.shuffle(rounds)
    tagged = [True] * n_tagged + [False] * (n_image - n_tagged)
    rng.shuffle(tagged)
    plan = [(k, r, t) for k, r, t in zip(kinds, rounds, tagged)] + [("text", 1, False)] * n_text
    rng.shuffle(plan)
    return plan


def _records(split: str, n: int, seed: int, size: int) -> Iterator[tuple[dict, Image.Image | None]]:
    rng = random.Random(f"vltrain-demo/{seed}/{split}")
    for index, (kind, rounds, tagged) in enumerate(_plan(rng, n)):
        if kind == "text":
            question, answer = rng.choice(TEXT_FACTS)
            yield {"query": question, "response": answer, "history": [], "images": []}, None
            continue
        shapes, turns = _image_record(rng, size, kind, rounds)
        turns = [list(t) for t in turns]
        if tagged:
            turns[0][0] = f"{IMAGE_TAG}\n{turns[0][0]}"
        record = {
            "query": turns[-1][0],
            "response": turns[-1][1],
            "history": turns[:-1],
            "images": [f"images/{split}_{index:05d}.png"],
        }
        yield record, _draw(shapes, size)


# ---------------------------------------------------------------- writing


def write_demo_dataset(
    root: Path, n_train: int = 2000, n_val: int = 200, seed: int = 0, image_size: int = 224
) -> DemoSplit:
    """Write (or reuse) the demo dataset under ``root``; returns the JSONL paths."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    split = DemoSplit(train=root / "train.jsonl", val=root / "val.jsonl")
    params = {
        "version": FORMAT_VERSION,
        "n_train": n_train,
        "n_val": n_val,
        "seed": seed,
        "image_size": image_size,
    }
    stamp = root / STAMP_NAME
    with FileLock(root / ".demo.lock"):  # ranks sharing a root: one writes, the others wait and reuse
        if split.train.exists() and split.val.exists() and stamp.exists() and (root / "images").is_dir():
            try:
                if json.loads(stamp.read_text()) == params:
                    return split
            except ValueError:
                pass
        stamp.unlink(missing_ok=True)
        images = root / "images"
        images.mkdir(exist_ok=True)
        for old in images.glob("*.png"):
            if re.fullmatch(r"(train|val)_\d+\.png", old.name):
                old.unlink()
        for name, n, path in (("train", n_train, split.train), ("val", n_val, split.val)):
            lines = []
            for record, image in progress(_records(name, n, seed, image_size), total=n, desc=f"demo data ({name})",
                                          unit="rows"):
                if image is not None:
                    image.save(root / record["images"][0], format="PNG", compress_level=6)
                lines.append(json.dumps(record, ensure_ascii=False) + "\n")
            write_atomic(path, "".join(lines))
        write_atomic(stamp, json.dumps(params, sort_keys=True) + "\n")  # last: marks the files complete
    return split


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def majority_baseline(val_path: Path, train_path: Path | None = None) -> float:
    """Accuracy on ``val_path`` of always giving the most common answer per question text.

    This is what an image-blind model can reach; text-only questions count as
    answerable, since their text determines the answer. By default the
    majority answers are taken from the split itself (an upper bound); with
    ``train_path`` they are taken from the training split instead.
    """
    val = _read_jsonl(Path(val_path))
    if not val:
        return 0.0
    fit = _read_jsonl(Path(train_path)) if train_path is not None else val
    by_question: dict[str, Counter] = defaultdict(Counter)
    for record in fit:
        by_question[question_text(record["query"])][record["response"]] += 1
    majority = {q: c.most_common(1)[0][0] for q, c in by_question.items()}
    hits = sum(majority.get(question_text(r["query"])) == r["response"] for r in val)
    return hits / len(val)
