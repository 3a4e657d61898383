"""The interactive chat loop (`python -m vltrain.infer` without a dataset), as ms-swift's `swift infer` has it.

    <<< What colour is the square? <image>        a query; InternVL2 types ask one path per <image>/<video> tag
    Input an image path or URL <<< shapes.png
    The square is red.                            the reply, streamed token by token
    --------------------------------------------------

Commands: `exit` / `quit` (or Ctrl-D) end the session; `clear` empties the history and the media; `multi-line`
reads a message over several lines, ended by a line ending with `#` (`single-line` switches back; a command
typed as the first line of a message is obeyed);
`reset-system` reads a new system message (empty: none) and clears the history. Ctrl-C during a reply stops it
(the turn is dropped) and the session goes on; at the prompt it discards the line. Inline `<img>path</img>` in a
query works without a prompt. V1.5 model types (`model.merge_image_blocks`) take one image per dialogue: asked
for when the dialogue has none yet and the query has no tag (an empty answer: no image). Each turn is appended
to `<result_dir>/chat-<time>.jsonl`. Lines are edited with readline where Python has it.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

from vltrain.data.media import MediaError
from vltrain.data.records import IMAGE_TAG, VIDEO_TAG, RecordError
from vltrain.infer.engine import Conversation, Engine

DASHES = "-" * 50
HELP = ("Input `exit` or `quit` to exit the conversation.\n"
        "Input `multi-line` to switch to multi-line input mode.\n"
        "Input `reset-system` to reset the system and clear the history.\n"
        "Input `clear` to clear the history.")
MEDIA_HELP = "Type <image> (or <video>) in a query where a picture (or video) goes; you will be asked for its path."
MEDIA_HELP_V15 = "The first query of a dialogue asks for an image (press Enter for none)."
COMMANDS = ("exit", "quit", "clear", "multi-line", "single-line", "reset-system")
_INLINE = re.compile(r"<img>(.+?)</img>")
_TAGS = re.compile(f"({IMAGE_TAG}|{VIDEO_TAG})")


class ChatState:
    """The dialogue so far: rounds, media, system."""

    def __init__(self, system: str | None = None):
        self.system = system
        self.clear()

    def clear(self) -> None:
        self.history: list[tuple[str, str]] = []
        self.images: list[str] = []
        self.videos: list[str] = []


def _read(prompt: str, multi_line: bool) -> str:
    """One message: a line, or in multi-line mode lines until one ends with `#` (the `#` dropped)."""
    if not multi_line:
        return input(prompt)
    lines = []
    while True:
        line = input(prompt if not lines else "")
        if not lines and line.strip() in COMMANDS:
            return line
        if line.endswith("#"):
            lines.append(line[:-1])
            return "\n".join(lines)
        lines.append(line)


def ask_media(query: str, state: ChatState, merged_blocks: bool, read=input) -> str | None:
    """The query with its inline `<img>path</img>` turned into tags, and the media it names added to `state`
    (paths asked for, in order of the tags). None when a media prompt was left empty under an InternVL2 type."""
    images, videos = list(state.images), list(state.videos)
    if merged_blocks:
        if not images:
            inline = _INLINE.findall(query)
            query = _INLINE.sub(IMAGE_TAG, query)
            tags = query.count(IMAGE_TAG)
            images += inline
            for _ in range(tags - len(inline) if tags else 1):
                path = read("Input an image path or URL <<< ").strip()
                if path:
                    images.append(path)
        state.images, state.videos = images, videos
        return query
    pieces = _TAGS.split(_INLINE.sub(lambda m: IMAGE_TAG + "\0" + m[1] + "\0", query))
    out = []
    k = 0
    while k < len(pieces):
        piece = pieces[k]
        if piece in (IMAGE_TAG, VIDEO_TAG):
            after = pieces[k + 1] if k + 1 < len(pieces) else ""
            if piece == IMAGE_TAG and after.startswith("\0"):  # inline <img>path</img>
                path, _, rest = after[1:].partition("\0")
                images.append(path)
                out += [IMAGE_TAG, rest]
                k += 2
                continue
            kind = "an image" if piece == IMAGE_TAG else "a video"
            path = read(f"Input {kind} path or URL <<< ").strip()
            if not path:
                print(f"no {kind.split()[1]} given: the query is not sent")
                return None
            (images if piece == IMAGE_TAG else videos).append(path)
        out.append(piece)
        k += 1
    state.images, state.videos = images, videos
    return "".join(out)


def chat(engine: Engine, result_dir: Path, system: str | None = None, merged_blocks: bool = False,
         generation: dict | None = None) -> Path:
    """Run the loop on stdin/stdout until `exit` or end of input; returns the result file."""
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    generation = generation or {}
    result_file = Path(result_dir) / f"chat-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    print(HELP)
    print(MEDIA_HELP_V15 if merged_blocks else MEDIA_HELP)
    state = ChatState(system)
    multi_line = False
    read_system = False
    while True:
        prompt = "<<<" + ("[M" if multi_line else "[") + ("S] " if read_system else "] ")
        prompt = prompt.replace("[] ", " ")
        try:
            text = _read(prompt, multi_line)
        except EOFError:
            print()
            break
        except KeyboardInterrupt:
            print()
            continue
        if read_system:
            state.system, read_system = text, False  # "": no system block
            state.clear()
            continue
        command = text.strip()
        if command in ("exit", "quit"):
            break
        if command == "clear":
            state.clear()
            continue
        if command == "multi-line" or command == "single-line":
            multi_line = command == "multi-line"
            continue
        if command == "reset-system":
            read_system = True
            continue
        if not command:
            continue
        saved = (list(state.images), list(state.videos))
        try:
            query = ask_media(text, state, merged_blocks)
        except (EOFError, KeyboardInterrupt):
            print()
            state.images, state.videos = saved
            continue
        if query is None:
            state.images, state.videos = saved
            continue
        conversation = Conversation(query=query, history=list(state.history), system=state.system,
                                    images=list(state.images), videos=list(state.videos))
        reply = _stream_reply(engine, conversation, generation)
        print(f"\n{DASHES}", flush=True)
        if reply is None:
            state.images, state.videos = saved
            continue
        state.history.append((query, reply))
        _append(result_file, {"system": state.system, "query": query, "response": reply,
                              "history": [list(p) for p in state.history[:-1]], "images": state.images,
                              "videos": state.videos})
    if result_file.is_file():
        print(f"[INFO] chat saved to {result_file}")
    return result_file


def _stream_reply(engine: Engine, conversation: Conversation, generation: dict) -> str | None:
    """Print the reply as it comes; None when it was interrupted or the input could not be read."""
    shown = ""
    stream = None
    try:
        stream = engine.stream(conversation, **generation)
        for text in stream:
            if text.startswith(shown):
                sys.stdout.write(text[len(shown):])
            else:  # the reply's end was cut back (a stop word): show it again from the start
                sys.stdout.write("\n" + text)
            sys.stdout.flush()
            shown = text
        return shown
    except KeyboardInterrupt:
        print("\n[interrupted: the turn is dropped]", end="")
        return None
    except (RecordError, MediaError) as e:
        print(f"error: {e}", end="")
        return None
    finally:
        if stream is not None:
            stream.close()


def _append(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
