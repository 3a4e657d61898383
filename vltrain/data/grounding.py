"""Grounding: `<ref-object>` and `<bbox>` placeholders filled from a record's `objects`.

Rules:
  - Placeholders may stand in queries and responses of every round. They are consumed in conversation order
    (round 1 query, round 1 response, round 2 query, ...) with two independent counters: the k-th `<ref-object>`
    takes `objects[k].caption`, the k-th `<bbox>` takes `objects[k].boxes`. So `Find <ref-object>` -> `<bbox>`
    uses objects[0] twice, and so does `Describe <bbox>` -> `<ref-object>`.
  - More placeholders of one kind than objects, or an object that no placeholder uses, is an error: a record
    never trains with a placeholder left as text or an object silently dropped.
  - `<ref-object>` -> `<ref>{caption}</ref>`.
  - `<bbox>` -> `<box>[[x1, y1, x2, y2]]</box>` (box_style `internvl`, the form of InternVL's own grounding data)
    or `<box> [[x1, y1, x2, y2]] </box>` (box_style `swift`, ms-swift 2.x). Several boxes of one object:
    `<box>[[a, b, c, d], [e, f, g, h]]</box>` (internvl) / `<box> [[a, b, c, d],[e, f, g, h]] </box>` (swift,
    no space between boxes, as ms-swift writes it).
  - Coordinates become integers in thousandths of the image (0..1000; x by width, y by height), the scale the
    InternVL models read and write (their evaluation decodes a box as `value / 1000 * size`):
        real       value = c * 1000 / size,  size = width or height of `images[object.image]` as loaded
        norm_1000  value = c
        norm_1     value = c * 1000
    then rounded to the nearest integer, halves up: `floor(value + 1/2)`. The arithmetic is exact on the
    decimal the record wrote (a JSON `32.32` is 32.32, not the nearest binary float), so edge values never
    depend on float error. Example: image width 640, x = 32.32 -> 32.32 * 1000 / 640 = 50.5 -> 51; x = 100 ->
    156.25 -> 156; x = 640 -> 1000. (ms-swift 2.x uses `int(c / size * 999)`, truncating to 0..999: 50 here.)
  - A box must lie inside its range: real 0 <= x <= width, 0 <= y <= height; norm_1000 0..1000; norm_1 0..1.
    An empty or inverted box (x1 >= x2 or y1 >= y2) is an error, as when the record file is read.
  - `objects[i].image` must name one of the record's images (boxes locate something in that image).
Errors are `RecordError`s naming `objects[i].bbox`, `objects[i].image`, or the text field holding a placeholder
left over (`query`, `response`, `history[i][0]`, `history[i][1]`, spelled as the row writes them: `Record.error`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from decimal import Decimal
from fractions import Fraction

from vltrain.data.records import (
    BBOX_TYPES,
    BOX_PLACEHOLDER,
    REF_PLACEHOLDER,
    GroundingObject,
    Record,
    grounding_placeholders,
)

BOX_STYLES = ("internvl", "swift")
_PLACEHOLDER = re.compile(f"({re.escape(REF_PLACEHOLDER)}|{re.escape(BOX_PLACEHOLDER)})")


def _exact(value: float) -> Fraction:
    """The decimal a JSON number was written as, exactly (str of a float is its shortest round-trip form)."""
    return Fraction(Decimal(str(float(value)))) if isinstance(value, float) else Fraction(value)


def to_thousandths(value: float, scale: Fraction | int) -> int:
    """`value * scale`, rounded to the nearest integer with halves up, computed exactly.

    scale is `1000 / size` for real coordinates (pass a Fraction), 1 for norm_1000, 1000 for norm_1.
    """
    return math.floor(_exact(value) * Fraction(scale) + Fraction(1, 2))


def normalize_box(box: Sequence[float], bbox_type: str, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """One `(x1, y1, x2, y2)` box in thousandths; `size` = (width, height) of its image.

    Raises ValueError with a message for a box outside its range or inverted.
    """
    x1, y1, x2, y2 = box
    width, height = size
    if bbox_type == "real":
        limits, scales = (width, height), (Fraction(1000, width), Fraction(1000, height))
        where = f"the {width}x{height} image"
    elif bbox_type == "norm_1000":
        limits, scales, where = (1000, 1000), (1, 1), "norm_1000's range 0..1000"
    elif bbox_type == "norm_1":
        limits, scales, where = (1, 1), (1000, 1000), "norm_1's range 0..1"
    else:
        raise ValueError(f"unknown bbox_type {bbox_type!r} (known: {', '.join(BBOX_TYPES)})")
    shown = f"[{x1}, {y1}, {x2}, {y2}]"
    for name, value, limit in (("x1", x1, limits[0]), ("y1", y1, limits[1]), ("x2", x2, limits[0]),
                               ("y2", y2, limits[1])):
        if not 0 <= value <= limit:
            raise ValueError(f"box {shown} lies outside {where} ({name}={value})")
    if x1 >= x2 or y1 >= y2:
        raise ValueError(f"box {shown} is empty or inverted (expected x1 < x2 and y1 < y2)")
    return (to_thousandths(x1, scales[0]), to_thousandths(y1, scales[1]),
            to_thousandths(x2, scales[0]), to_thousandths(y2, scales[1]))


def format_boxes(boxes: Sequence[tuple[int, int, int, int]], style: str = "internvl") -> str:
    """`<box>[[x1, y1, x2, y2], ...]</box>` in the given style (see the module docstring)."""
    inner = [f"[{', '.join(str(c) for c in box)}]" for box in boxes]
    if style == "internvl":
        return f"<box>[{', '.join(inner)}]</box>"
    if style == "swift":
        return f"<box> [{','.join(inner)}] </box>"
    raise ValueError(f"unknown box_style {style!r} (known: {', '.join(BOX_STYLES)})")


def format_ref(caption: str) -> str:
    return f"<ref>{caption}</ref>"


def fill_placeholders(record: Record, fields: list[tuple[str, str]], image_sizes: Sequence[tuple[int, int]],
                      style: str = "internvl") -> list[str]:
    """The texts of `fields` ((ms-swift field name, text) in conversation order) with every placeholder filled.

    `record` supplies `objects` and the error location; `image_sizes[i]` is the (width, height) of `images[i]`.
    """
    objects: list[GroundingObject] = list(record.objects or [])
    if not objects and not any(grounding_placeholders(text) for _, text in fields):
        return [text for _, text in fields]

    def fail(field_name: str, message: str):
        raise record.error(field_name, message)

    refs, boxes = [], []
    for i, obj in enumerate(objects):
        if not 0 <= obj.image < len(image_sizes):
            fail(f"objects[{i}].image", f"image {obj.image} does not exist (the record has {len(image_sizes)} "
                                        f"image{'s' if len(image_sizes) != 1 else ''}; a box needs its image)")
        if not obj.boxes:
            fail(f"objects[{i}].bbox", "no box")
        normalized = []
        for j, box in enumerate(obj.boxes):
            try:
                normalized.append(normalize_box(box, obj.bbox_type, image_sizes[obj.image]))
            except ValueError as e:
                which = f"box {j + 1} of {len(obj.boxes)}: " if len(obj.boxes) > 1 else ""
                fail(f"objects[{i}].bbox", which + str(e))
        refs.append(format_ref(obj.caption))
        boxes.append(format_boxes(normalized, style))

    used = {REF_PLACEHOLDER: 0, BOX_PLACEHOLDER: 0}
    filled = []
    for name, text in fields:
        pieces = _PLACEHOLDER.split(text)
        for k in range(1, len(pieces), 2):  # odd pieces are the placeholders
            tag = pieces[k]
            index = used[tag]
            if index >= len(objects):
                fail(name, f"{tag} #{index + 1} has no object (the record has {len(objects)} object"
                           f"{'s' if len(objects) != 1 else ''})")
            pieces[k] = (refs if tag == REF_PLACEHOLDER else boxes)[index]
            used[tag] += 1
        filled.append("".join(pieces))
    reached = max(used.values())
    if reached < len(objects):
        fail(f"objects[{reached}]", f"not used by any placeholder ({len(objects)} objects, {used[REF_PLACEHOLDER]} "
                                    f"{REF_PLACEHOLDER} and {used[BOX_PLACEHOLDER]} {BOX_PLACEHOLDER})")
    return filled
