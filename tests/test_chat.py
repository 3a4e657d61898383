"""The interactive chat, driven through a real pseudo-terminal: multi-turn, an image prompt answered with a path,
`clear`, Ctrl-C at the prompt, `exit`, and the result file; the media prompts' rules."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.test_infer import make_lora_checkpoint
from vltrain.data.demo import write_demo_dataset
from vltrain.infer.chat import DASHES, ChatState, ask_media

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_chat_in_a_terminal(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    demo = write_demo_dataset(tmp_path / "demo", n_train=8, n_val=2)
    ckpt = make_lora_checkpoint(tmp_path / "run", demo)
    image = sorted((demo.train.parent / "images").iterdir())[0]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "dumb"}
    child = pexpect.spawn(sys.executable, ["-m", "vltrain.infer", f"ckpt_dir={ckpt}", "max_new_tokens=5"],
                          cwd=str(tmp_path), env=env, encoding="utf-8", timeout=300)
    try:
        child.expect_exact("Input `clear` to clear the history.")
        child.expect_exact("<<< ")
        child.sendline("Hello there")
        child.expect_exact(DASHES)
        child.expect_exact("<<< ")
        child.sendline("What colour is it? <image>")
        child.expect_exact("Input an image path or URL <<< ")
        child.sendline(str(image))
        child.expect_exact(DASHES)
        child.expect_exact("<<< ")
        child.sendintr()  # Ctrl-C at the prompt: the line is dropped, the session goes on
        child.expect_exact("<<< ")
        child.sendline("clear")
        child.expect_exact("<<< ")
        child.sendline("And now?")
        child.expect_exact(DASHES)
        child.expect_exact("<<< ")
        child.sendline("exit")
        child.expect_exact("chat saved to")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before
    (result,) = (ckpt / "infer_result").glob("chat-*.jsonl")
    rows = [json.loads(line) for line in result.read_text().splitlines()]
    assert [r["query"] for r in rows] == ["Hello there", "What colour is it? <image>", "And now?"]
    assert rows[1]["images"] == [str(image)] and rows[1]["history"] == [["Hello there", rows[0]["response"]]]
    assert rows[2]["images"] == [] and rows[2]["history"] == []  # after `clear`


def test_media_prompts(monkeypatch):
    answers = iter(["a.png", "clip.mp4"])
    state = ChatState()
    query = ask_media("<image> and <video> and <img>b.png</img>?", state, merged_blocks=False,
                      read=lambda prompt: next(answers))
    assert query == "<image> and <video> and <image>?"
    assert state.images == ["a.png", "b.png"] and state.videos == ["clip.mp4"]
    # V1.5: one image per dialogue, asked for when the query has no tag; an empty answer means none
    state = ChatState()
    assert ask_media("What is it?", state, merged_blocks=True, read=lambda p: "c.png") == "What is it?"
    assert state.images == ["c.png"]
    assert ask_media("More?", state, merged_blocks=True, read=lambda p: pytest.fail("asked twice")) == "More?"
    state = ChatState()
    assert ask_media("Hi", state, merged_blocks=True, read=lambda p: "") == "Hi" and state.images == []
    # InternVL2: an unanswered tag does not send the query
    state = ChatState()
    assert ask_media("<image> what?", state, merged_blocks=False, read=lambda p: "") is None and state.images == []


def test_multi_line_messages_end_with_a_hash_and_commands_still_work(monkeypatch):
    from vltrain.infer.chat import _read

    lines = iter(["<image>", "What is it?#", "single-line"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert _read("<<<[M] ", multi_line=True) == "<image>\nWhat is it?"
    assert _read("<<<[M] ", multi_line=True) == "single-line"
