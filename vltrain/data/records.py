"""Records: the rows of a `.jsonl` or `.json` data file, read and checked into one `Record` type.

A `.jsonl` file holds one JSON object per line; a `.json` file one array of objects (a record's line is the line
where its object starts). Each row has one of three formats, never a mix:

  ms-swift   {"query": "<image>What is this?", "response": "A cat.", "history": [["Hi", "Hello"]],
              "system": "...", "images": ["cat.jpg"], "videos": [...], "objects": [...]}
  messages   {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                           {"role": "assistant", "content": "..."}, ...], "images": [...], "videos": [...],
              "objects": [...]}
  InternVL   {"id": 0, "image": "cat.jpg" | ["a.jpg", "b.jpg"], "video": "clip.mp4", "width": 640, "height": 480,
              "conversations": [{"from": "system", "value": "..."}, {"from": "human", "value": "<image>\\n..."},
                                {"from": "gpt", "value": "..."}, ...]}
             (official InternVL chat data; `user`/`assistant` are read for `human`/`gpt`, `images`/`videos`
             for `image`/`video`, and `objects` too; `id`, `width` and `height` are accepted and not used)

Turns alternate user, assistant (a system turn may come first) and end with the assistant's answer; every
answer must have text, since an empty one leaves nothing to learn.

Media references: `images` hold local paths (relative to the data file, or absolute; checked to exist here),
`http(s)` URLs, and base64 images (raw, or `data:image/<type>;base64,...`); `videos` hold paths or URLs. URLs and
base64 are kept as given and read later (vltrain.data.media). A single string is read as a one-item list.

Tags: `<image>` and `<video>` stand in queries (the user's turns) where a medium goes; there may not be more tags
than media, and untagged media are placed by the encoder. `<img>path</img>` in a query (ms-swift's inline form,
likewise `<video>path</video>`) becomes a tag at that spot with the path appended to the media in order of
appearance; it may not be combined with the `images` field or `<image>` tags in one row. Responses and the
system prompt hold no media tags. An official-format row follows the same rules: its `<video>` placeholder is a
tag like any other (a missing one goes to the start of the first query, as the official loader puts it).

Grounding: `objects` (a list, or a JSON string of one) of `{"caption": str, "bbox": [x1, y1, x2, y2] or a list
of such boxes, "bbox_type": "real" | "norm_1000" | "norm_1" (default "real"), "image": index (default 0)}`, or
ms-swift's `[caption, bbox]` pairs (coordinates taken as given: norm_1000). `<ref-object>` and `<bbox>` in the
texts take them in order; a row with placeholders needs objects and a row with objects needs placeholders.
Checked here: types, 4 finite non-negative numbers per box with x1 < x2 and y1 < y2, norm ranges, the image
index. Checked by the encoder (vltrain.data.grounding), which knows the image sizes and the placeholder order:
real boxes inside their image, and placeholder counts against objects.

Every problem is a `RecordError` that reads `file:line: field: message`, `field` being the path inside the row
as the row writes it (`messages[3].role`, `history[0][1]`, `objects[1].bbox`, `image[2]`), also for problems the
encoder finds later (`Record.error`). Elements of a `.json` array that share a line (a compact array) are told
apart by their index in the array before the path: `data.json:1: [4].response: ...`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from vltrain.data.media import describe, is_data_uri, is_url, looks_like_base64_image

IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"
REF_PLACEHOLDER = "<ref-object>"
BOX_PLACEHOLDER = "<bbox>"
BBOX_TYPES = ("real", "norm_1000", "norm_1")
BBOX_LIMITS = {"norm_1000": 1000, "norm_1": 1}

SWIFT_FIELDS = ("query", "response", "history", "system", "images", "videos", "objects")
MESSAGES_FIELDS = ("messages", "images", "videos", "objects")
CONVERSATIONS_FIELDS = ("conversations", "image", "images", "video", "videos", "objects", "id", "width", "height")
ROLE_NAMES = {"messages": ("role", "content", {"system": "system", "user": "user", "assistant": "assistant"}),
              "conversations": ("from", "value", {"system": "system", "human": "user", "user": "user",
                                                  "gpt": "assistant", "assistant": "assistant"})}
# ms-swift columns vltrain does not train with; named so the error says why.
UNSUPPORTED = {"rejected_response": "preference data is not supported", "tools": "tool calls are not supported",
               "query_role": "roles are fixed (user, assistant)", "history_roles": "roles are fixed (user, assistant)",
               "audios": "audio is not supported", "label": "preference data is not supported"}
INLINE = {IMAGE_TAG: re.compile(r"<img>(.+?)</img>"), VIDEO_TAG: re.compile(r"<video>(.+?)</video>")}


class RecordError(ValueError):
    """A problem with one row, located as `file:line: field: message`. `row` (1-based position of the row in its
    file; 0 = unknown) tells apart rows that share a line, as in a compact `.json` array."""

    def __init__(self, source: str, line: int, field_name: str, message: str, row: int = 0):
        self.source, self.line, self.field, self.message, self.row = source, line, field_name, message, row
        super().__init__(f"{source}:{line}: {field_name}: {message}")

    def __reduce__(self):  # picklable, so that errors come back from worker processes
        return type(self), (self.source, self.line, self.field, self.message, self.row)

    @property
    def key(self) -> tuple[str, int]:
        """Identifies the row: (source, row), or (source, line) when the row is unknown."""
        return (self.source, self.row or self.line)


@dataclass
class GroundingObject:
    """One `objects` entry: a caption and its box(es) on one image.

    Boxes of bbox_type `real` are in pixels of `images[image]`; whether they lie inside it is checked where the
    image is loaded (vltrain.data.grounding.normalize_box).
    """

    caption: str
    boxes: list[tuple[float, float, float, float]]
    """x1, y1, x2, y2 in `bbox_type` units; one or more."""
    bbox_type: str = "real"
    """"real" (pixels), "norm_1000" (0..1000) or "norm_1" (0..1)."""
    image: int = 0
    """Index into `Record.images`."""


@dataclass
class Record:
    """One conversation. `history` rounds come before the final (`query`, `response`) round."""

    query: str
    response: str
    history: list[tuple[str, str]] = field(default_factory=list)
    system: str | None = None
    """None: the template's default system prompt; "": no system block."""
    images: list[str] = field(default_factory=list)
    """Image refs: absolute local path, http(s) URL, or base64 / data: URI."""
    videos: list[str] = field(default_factory=list)
    """Video refs: absolute local path or http(s) URL."""
    objects: list[GroundingObject] = field(default_factory=list)
    source: str = "<memory>"
    line: int = 0
    """Line of the file where the row starts."""
    row: int = 0
    """1-based position of the row in its file (0: not from a file); rows of a compact `.json` array share a line."""
    field_names: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    """The row's own spelling of the fields named here in ms-swift terms (`query`, `history[0][1]`, `images[2]`,
    ...) where it differs: `messages[3].content`, `conversations[1].value`, `image[2]`, or the query holding an
    inline `<img>`. `""` holds a prefix for every field (`[4].`: the element of a `.json` array sharing its line)."""

    @property
    def rounds(self) -> list[tuple[str, str]]:
        return [*self.history, (self.query, self.response)]

    @property
    def key(self) -> tuple[str, int]:
        """Identifies the row (as `RecordError.key` does): (source, row), or (source, line) when not from a file."""
        return (self.source, self.row or self.line)

    def where(self) -> str:
        return f"{self.source}:{self.line}"

    def field_name(self, name: str) -> str:
        """The field `name` (ms-swift spelling) as the row writes it."""
        return self.field_names.get(name) or self.field_names.get("", "") + name

    def error(self, name: str, message: str) -> RecordError:
        """A RecordError at this row, `name` (ms-swift spelling) given as the row writes it."""
        return RecordError(self.source, self.line, self.field_name(name), message, self.row)


def round_field(round_index: int, n_rounds: int, part: int) -> str:
    """The ms-swift field holding part 0 (query) or 1 (response) of round `round_index` of `n_rounds`."""
    if round_index == n_rounds - 1:
        return ("query", "response")[part]
    return f"history[{round_index}][{part}]"


def tag_count_problem(tag: str, tags: int, media: int) -> str | None:
    """The message for more `tag`s in the queries than media, else None."""
    if tags <= media:
        return None
    kind = tag.strip("<>")
    return (f"{tags} {tag} tag{'s' if tags != 1 else ''} in the queries but {media} {kind}{'s' if media != 1 else ''}")


def grounding_placeholders(text: str) -> list[str]:
    """The grounding placeholders (`<ref-object>`, `<bbox>`) found in `text`."""
    return [tag for tag in (REF_PLACEHOLDER, BOX_PLACEHOLDER) if tag in text]


# ---------------------------------------------------------------- files


def read_records(path: str | Path, errors: list[RecordError] | None = None) -> list[Record]:
    """Every row of a `.jsonl` or `.json` file as a Record.

    errors=None: the first bad row raises its RecordError. With a list: each bad row's RecordError is appended
    and the row skipped. Problems with the file itself (missing, wrong extension, not a JSON array, no rows, a
    JSON syntax error in a `.json` file, after which no row can be located) raise in both cases.
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: dataset file not found")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json"):
        raise RecordError(source, 0, "file", f"unsupported extension '{path.suffix}' (expected .jsonl or .json)")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise RecordError(source, data.count(b"\n", 0, e.start) + 1, "file", f"not UTF-8 text ({e.reason} at byte "
                                                                              f"{e.start})") from None
    if suffix == ".jsonl":
        rows = _jsonl_rows(text, source)
        prefixes = None
    else:
        rows = list(_json_array_rows(text, source))
        per_line = Counter(line for line, _ in rows)
        # Elements of a compact array share a line: their field paths start with the element's index.
        prefixes = [f"[{k}]." if per_line[line] > 1 else "" for k, (line, _) in enumerate(rows)]
    records, n_rows = [], 0
    for k, (line, row) in enumerate(rows):
        n_rows += 1
        try:
            if isinstance(row, RecordError):
                raise RecordError(row.source, row.line, row.field, row.message, k + 1)
            records.append(parse_row(row, source, line, path.parent, row_number=k + 1,
                                     prefix=prefixes[k] if prefixes else ""))
        except RecordError as e:
            if errors is None:
                raise
            errors.append(e)
    if not n_rows:
        raise RecordError(source, 0, "file", "no rows")
    return records


def _jsonl_rows(text: str, source: str):
    """(line, row) per non-blank line; a line that is not JSON gives a RecordError in place of the row."""
    for line, raw in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON strings may hold U+2028
        if not raw.strip():
            continue
        try:
            yield line, json.loads(raw)
        except json.JSONDecodeError as e:
            yield line, RecordError(source, line, "json", f"invalid JSON ({e.msg} at column {e.colno})")


def _json_array_rows(text: str, source: str):
    """(line where the element starts, element) for each element of a top-level JSON array."""
    decoder = json.JSONDecoder()
    blank = re.compile(r"\s*")
    line, counted = 1, 0

    def line_at(pos: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    def fail(pos: int, message: str):
        raise RecordError(source, line_at(pos), "json", message)

    pos = blank.match(text).end()
    if text[pos:pos + 1] != "[":
        raise RecordError(source, line_at(pos), "file",
                          "expected a JSON array of records ([{...}, ...]); one record per line is a .jsonl file")
    pos = blank.match(text, pos + 1).end()
    if text[pos:pos + 1] != "]":
        while True:
            try:
                row, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise RecordError(source, e.lineno, "json", f"invalid JSON ({e.msg} at column {e.colno})") from None
            yield line_at(pos), row
            pos = blank.match(text, end).end()
            if text[pos:pos + 1] == "]":
                break
            if text[pos:pos + 1] != ",":
                fail(pos, "invalid JSON (expected ',' or ']' after an array element)")
            pos = blank.match(text, pos + 1).end()
    if text[blank.match(text, pos + 1).end():]:
        fail(blank.match(text, pos + 1).end(), "invalid JSON (text after the closing ']')")


# ---------------------------------------------------------------- rows


@dataclass
class _Text:
    text: str
    field: str


def parse_row(row, source: str, line: int, base_dir: Path, *, row_number: int = 0, prefix: str = "") -> Record:
    """Check one decoded row and build its Record; media paths are resolved against `base_dir`.

    `row_number`: the row's 1-based position in its file; `prefix`: put before every field path in errors.
    """

    def fail(field_name: str, message: str):
        raise RecordError(source, line, prefix + field_name, message, row_number)

    form = _row_format(row, fail)
    if form == "ms-swift":
        system, rounds = _swift_turns(row, fail)
    else:
        system, rounds = _role_turns(row, form, fail)

    image_field, video_field = "images", "videos"
    if form == "conversations":
        for official, swift in (("image", "images"), ("video", "videos")):
            if official in row and swift in row:
                fail(swift, f"both {official!r} and {swift!r} given; use one")
        image_field = "image" if "image" in row else "images"
        video_field = "video" if "video" in row else "videos"
    images = _media_list(row.get(image_field), image_field, fail)
    videos = _media_list(row.get(video_field), video_field, fail)

    for answer in [a for _, a in rounds] + ([system] if system else []):
        if _media_tags(answer.text):
            where = "the system prompt" if answer is system else "responses"
            fail(answer.field, f"{_media_tags(answer.text)[0]} in {where}: media tags belong in queries")
    queries = [q for q, _ in rounds]
    images = _inline_media(queries, images, IMAGE_TAG, image_field, fail)
    videos = _inline_media(queries, videos, VIDEO_TAG, video_field, fail)
    image_refs = [_resolve(ref, name, base_dir, "image", fail) for ref, name in images]
    video_refs = [_resolve(ref, name, base_dir, "video", fail) for ref, name in videos]
    for tag, media, name in ((IMAGE_TAG, images, image_field), (VIDEO_TAG, videos, video_field)):
        problem = tag_count_problem(tag, sum(q.text.count(tag) for q in queries), len(media))
        if problem:
            fail(name, problem)

    objects = _objects(row.get("objects"), len(images), fail)
    _check_placeholders(system, rounds, objects, fail)

    # How the row spells the fields that the encoder names in ms-swift terms.
    spelled = {"images": image_field, "videos": video_field, **({"system": system.field} if system else {})}
    spelled |= {f"images[{i}]": name for i, (_, name) in enumerate(images)}
    spelled |= {f"videos[{i}]": name for i, (_, name) in enumerate(videos)}
    spelled |= {round_field(i, len(rounds), part): text.field
                for i, pair in enumerate(rounds) for part, text in enumerate(pair)}
    field_names = {k: prefix + v for k, v in spelled.items() if prefix + v != k}
    if prefix:
        field_names[""] = prefix

    (*history, (query, response)) = rounds
    return Record(
        query=query.text,
        response=response.text,
        history=[(q.text, a.text) for q, a in history],
        system=system.text if system else None,
        images=image_refs,
        videos=video_refs,
        objects=objects,
        source=source,
        line=line,
        row=row_number,
        field_names=field_names,
    )


def _row_format(row, fail) -> str:
    """`ms-swift`, `messages` or `conversations`: the one format of the row, whose fields are all known."""
    if not isinstance(row, dict):
        fail("row", f"expected a JSON object, got {_type(row)}")
    forms = [name for name, keys in (("ms-swift", ("query", "response", "history")), ("messages", ("messages",)),
                                     ("conversations", ("conversations",))) if any(k in row for k in keys)]
    if len(forms) > 1:
        fail("row", f"mixes the {forms[0]} and {forms[1]} formats; a row uses one of them")
    if not forms:
        fail("row", "no conversation: expected query/response, messages or conversations (the row has "
                    f"{', '.join(map(repr, row)) or 'no fields'})")
    form = forms[0]
    known = {"ms-swift": SWIFT_FIELDS, "messages": MESSAGES_FIELDS, "conversations": CONVERSATIONS_FIELDS}[form]
    for key in row:
        if key not in known:
            hint = UNSUPPORTED.get(key) or (f"a {form} row puts the system prompt in a system turn"
                                            if key == "system" else f"known in a {form} row: {', '.join(known)}")
            fail(key, f"unknown field ({hint})")
    return form


def _check_placeholders(system: _Text | None, rounds: list[tuple[_Text, _Text]], objects, fail) -> None:
    """Grounding placeholders stand in the turns only, and appear exactly when the row has objects."""
    if system and grounding_placeholders(system.text):
        fail(system.field, f"{grounding_placeholders(system.text)[0]} in the system prompt: placeholders belong in "
                           "the turns")
    placeholders = [t for pair in rounds for t in pair if grounding_placeholders(t.text)]
    if placeholders and not objects:
        fail(placeholders[0].field, f"{grounding_placeholders(placeholders[0].text)[0]} placeholder but the row has "
                                    "no objects")
    if objects and not placeholders:
        fail("objects", f"{len(objects)} object{'s' if len(objects) != 1 else ''} but no {REF_PLACEHOLDER} or "
                        f"{BOX_PLACEHOLDER} placeholder in the turns to use them")


def _type(value) -> str:
    return "null" if value is None else {dict: "object", list: "array", str: "string", bool: "boolean",
                                         int: "integer", float: "number"}.get(type(value), type(value).__name__)


def _swift_turns(row: dict, fail) -> tuple[_Text | None, list[tuple[_Text, _Text]]]:
    for name in ("query", "response"):
        if not isinstance(row.get(name), str):
            fail(name, "missing" if name not in row else f"expected a string, got {_type(row[name])}")
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        fail("system", f"expected a string or null, got {_type(system)}")
    history = row.get("history")
    if history is None:
        history = []
    if not isinstance(history, list):
        fail("history", f"expected a list of [query, response] pairs, got {_type(history)}")
    rounds = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            fail(f"history[{i}]", "expected a [query, response] pair of strings")
        rounds.append((_Text(pair[0], f"history[{i}][0]"), _Text(pair[1], f"history[{i}][1]")))
    rounds.append((_Text(row["query"], "query"), _Text(row["response"], "response")))
    for _, answer in rounds:
        if not answer.text.strip():
            fail(answer.field, "empty response: the round has nothing to learn")
    return (_Text(system, "system") if system is not None else None), rounds


def _role_turns(row: dict, form: str, fail) -> tuple[_Text | None, list[tuple[_Text, _Text]]]:
    """System and (user, assistant) rounds of a `messages` or `conversations` list."""
    role_key, text_key, roles = ROLE_NAMES[form]
    turns = row[form]
    if not isinstance(turns, list) or not turns:
        fail(form, f"expected a non-empty list of {{{role_key!r}: ..., {text_key!r}: ...}} turns, got "
                   f"{_type(turns) if not isinstance(turns, list) else 'an empty list'}")
    system, rounds, pending = None, [], None
    for i, turn in enumerate(turns):
        at = f"{form}[{i}]"
        if not isinstance(turn, dict):
            fail(at, f"expected an object with {role_key!r} and {text_key!r}, got {_type(turn)}")
        for key in turn:
            if key not in (role_key, text_key):
                fail(f"{at}.{key}", f"unknown field (a turn has {role_key!r} and {text_key!r})")
        for key in (role_key, text_key):
            if key not in turn:
                fail(f"{at}.{key}", "missing")
            if not isinstance(turn[key], str):
                hint = " (one string per turn; media go in the images/videos fields)" if key == text_key else ""
                fail(f"{at}.{key}", f"expected a string, got {_type(turn[key])}{hint}")
        role = roles.get(turn[role_key])
        if role is None:
            fail(f"{at}.{role_key}", f"unknown role {turn[role_key]!r} (known: {', '.join(roles)})")
        text = _Text(turn[text_key], f"{at}.{text_key}")
        expected = "user" if pending is None else "assistant"
        if role == "system":
            if i:
                fail(f"{at}.{role_key}", "a system turn may only come first")
            system = text
        elif role != expected:
            fail(f"{at}.{role_key}", f"expected a {expected} turn (turns alternate user, assistant), got "
                                     f"{turn[role_key]!r}")
        elif role == "user":
            pending = text
        else:
            if not text.text.strip():
                fail(text.field, "empty response: the round has nothing to learn")
            rounds.append((pending, text))
            pending = None
    if pending is not None:
        fail(f"{form}[{len(turns) - 1}].{role_key}", "the conversation ends with a user turn; the last turn must be "
                                                      "the assistant's answer (what is trained)")
    if not rounds:
        fail(form, "no user and assistant turns")
    return system, rounds


# ---------------------------------------------------------------- media


def _media_list(value, name: str, fail) -> list[tuple[str, str]]:
    """(ref, field path) per entry of an images/videos field; a string is one entry, null none."""
    if value is None:
        return []
    if isinstance(value, str):
        return [(value, name)] if value else []
    if not isinstance(value, list):
        fail(name, f"expected a list of strings, got {_type(value)}")
    for i, ref in enumerate(value):
        if not isinstance(ref, str) or not ref:
            fail(f"{name}[{i}]", f"expected a path, URL or base64 string, got "
                                 f"{'an empty string' if ref == '' else _type(ref)}")
    return [(ref, f"{name}[{i}]") for i, ref in enumerate(value)]


def _media_tags(text: str) -> list[str]:
    found = [tag for tag in (IMAGE_TAG, VIDEO_TAG) if tag in text]
    return found + [m[0] for pattern in INLINE.values() for m in [pattern.search(text)] if m]


def _inline_media(queries: list[_Text], media: list[tuple[str, str]], tag: str, name: str, fail):
    """Replace inline `<img>ref</img>` (or `<video>ref</video>`) in the queries by `tag`; the refs are appended."""
    pattern = INLINE[tag]
    found = [(q, m) for q in queries for m in pattern.finditer(q.text)]
    if not found:
        return media
    first = found[0][0].field
    if media:
        fail(first, f"inline {found[0][1][0]!r} cannot be combined with the {name!r} field in one row")
    if any(pattern.sub("", q.text).count(tag) for q in queries):
        fail(first, f"inline {found[0][1][0]!r} cannot be combined with {tag} tags in one row")
    for q in queries:
        q.text = pattern.sub(tag, q.text)
    return [(m[1].strip(), q.field) for q, m in found]


def _resolve(ref: str, name: str, base_dir: Path, kind: str, fail) -> str:
    """An image/video ref as Record keeps it: URLs and base64 as given, paths absolute and checked to exist."""
    if is_url(ref):
        return ref
    if is_data_uri(ref):
        if kind == "video":
            fail(name, f"{describe(ref)}: videos are read from files or URLs, not data URIs")
        if not re.match(r"data:image/[^;,]*(;[^;,]*)*;base64,", ref, re.IGNORECASE):
            fail(name, f"{describe(ref)}: only base64 image data URIs are read (data:image/<type>;base64,...)")
        return ref
    path = os.path.abspath(os.path.join(base_dir, ref))
    if os.path.isfile(path):
        return path
    if kind == "image" and looks_like_base64_image(ref):
        return ref
    fail(name, f"file not found: {describe(path)}" + ("" if kind == "image" else " (videos are files or URLs)"))


# ---------------------------------------------------------------- grounding


def _objects(value, n_images: int, fail) -> list[GroundingObject]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            fail("objects", f"a string must hold a JSON list of objects ({e.msg} at column {e.colno})")
    if not isinstance(value, list):
        fail("objects", f"expected a list of {{caption, bbox, bbox_type, image}} objects, got {_type(value)}")
    return [_object(item, f"objects[{i}]", n_images, fail) for i, item in enumerate(value)]


def _object(item, at: str, n_images: int, fail) -> GroundingObject:
    if isinstance(item, list) and len(item) == 2:  # ms-swift's [caption, bbox]: coordinates used as given
        item = {"caption": item[0], "bbox": item[1], "bbox_type": "norm_1000"}
    if not isinstance(item, dict):
        fail(at, f"expected an object {{caption, bbox, bbox_type, image}}, got {_type(item)}")
    for key in item:
        if key not in ("caption", "bbox", "bbox_type", "image"):
            fail(f"{at}.{key}", "unknown field (known: caption, bbox, bbox_type, image)")
    if not isinstance(item.get("caption"), str):
        fail(f"{at}.caption",
             "missing" if "caption" not in item else f"expected a string, got {_type(item['caption'])}")
    bbox_type = item.get("bbox_type", "real")
    if bbox_type not in BBOX_TYPES:
        fail(f"{at}.bbox_type", f"expected one of {', '.join(BBOX_TYPES)}, got {bbox_type!r}")
    image = item.get("image", 0)
    if not isinstance(image, int) or isinstance(image, bool):
        fail(f"{at}.image", f"expected an image index, got {_type(image)}")
    if not 0 <= image < n_images:
        fail(f"{at}.image", f"image {image} does not exist (the row has {n_images} image{'s' if n_images != 1 else ''};"
                            f" a box locates something in one of them)")
    bbox = item.get("bbox")
    if bbox is None:
        fail(f"{at}.bbox", "missing")
    nested = isinstance(bbox, list) and bool(bbox) and all(isinstance(b, list) for b in bbox)
    boxes = [_box(b, f"{at}.bbox[{j}]", bbox_type, fail) for j, b in enumerate(bbox)] if nested else \
        [_box(bbox, f"{at}.bbox", bbox_type, fail)]
    return GroundingObject(caption=item["caption"], boxes=boxes, bbox_type=bbox_type, image=image)


def _box(box, at: str, bbox_type: str, fail) -> tuple[float, float, float, float]:
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not (isinstance(box, list) and len(box) == 4 and all(number(v) for v in box)):
        fail(at, f"expected [x1, y1, x2, y2] (4 numbers) or a list of such boxes, got {json.dumps(box)[:80]}")
    x1, y1, x2, y2 = box
    if min(box) < 0:
        fail(at, f"negative coordinate in {box}")
    limit = BBOX_LIMITS.get(bbox_type)
    if limit is not None and max(box) > limit:
        fail(at, f"coordinate above {limit} in {box} (bbox_type {bbox_type} is 0..{limit})")
    if not (x1 < x2 and y1 < y2):
        fail(at, f"box {box} is empty or inverted (expected x1 < x2 and y1 < y2)")
    return (x1, y1, x2, y2)
