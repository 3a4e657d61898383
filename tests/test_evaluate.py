"""Evaluation never loses what it computed: every answer is on disk, batch by batch, before any scoring; a reply with
a malformed box scores 0 for that row instead of raising; a result file is never overwritten."""

from __future__ import annotations

import json

import pytest

from vltrain.config import compose_config
from vltrain.data.demo import write_demo_dataset
from vltrain.data.records import Record, read_records
from vltrain.infer import evaluate as evaluation
from vltrain.infer.engine import Engine
from vltrain.infer.evaluate import evaluate, final_answer, grounding_iou, parse_boxes, score
from vltrain.model.load import load_model_tokenizer, make_encoder


@pytest.fixture(scope="module")
def engine():
    cfg = compose_config(["dataset=custom", "dataset.train=[unused.jsonl]"])
    model, tokenizer = load_model_tokenizer(cfg.model)
    return Engine(model, make_encoder(cfg, model, tokenizer))


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    demo = write_demo_dataset(tmp_path_factory.mktemp("demo"), n_train=2, n_val=5)
    rows = read_records(demo.val)
    broken = Record(query="<image>What is it?", response="red", images=[str(demo.val.parent / "missing.png")],
                    source="broken.jsonl", line=1)
    return [rows[0], rows[1], broken, *rows[2:5]]  # 6 rows: the third cannot be encoded


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_every_row_is_written_in_order_with_its_answer_or_its_error(engine, records, tmp_path):
    result = evaluate(engine, records, tmp_path, batch_size=4, max_new_tokens=3)
    rows = _rows(result.result_file)
    assert [(r["source"], r["line"]) for r in rows] == [(r.source, r.line) for r in records]
    assert [r["response"] is None for r in rows] == [False, False, True, False, False, False]
    assert "missing.png" in rows[2]["error"] and rows[2]["label"] == "red"
    assert result.metrics["rows"] == 5 and result.metrics["failed_rows"] == 1
    summary = json.loads(result.summary_file.read_text(encoding="utf-8"))
    assert summary["result_file"] == str(result.result_file) and summary["rows"] == 5


def test_answers_of_finished_batches_survive_a_failure_in_a_later_batch(engine, records, tmp_path, monkeypatch):
    calls = []
    generate = Engine.generate

    def failing_generate(self, conversations, **kwargs):
        calls.append(len(conversations))
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return generate(self, conversations, **kwargs)

    monkeypatch.setattr(Engine, "generate", failing_generate)
    with pytest.raises(RuntimeError, match="out of memory"):
        evaluate(engine, records, tmp_path, batch_size=2, max_new_tokens=3)
    (result_file,) = tmp_path.glob("*.jsonl")
    rows = _rows(result_file)
    assert len(rows) == 2 and all(isinstance(r["response"], str) for r in rows)  # the first batch, answered
    assert not list(tmp_path.glob("*_summary.json"))


def test_answers_are_on_disk_before_scoring(engine, records, tmp_path, monkeypatch):
    def broken_score(answers, references):
        raise RuntimeError("a scoring bug")

    monkeypatch.setattr(evaluation, "score", broken_score)
    with pytest.raises(RuntimeError, match="a scoring bug"):
        evaluate(engine, records, tmp_path, batch_size=4, max_new_tokens=3)
    (result_file,) = tmp_path.glob("*.jsonl")
    assert sum(isinstance(r["response"], str) for r in _rows(result_file)) == 5


def test_a_result_file_of_the_same_second_is_not_overwritten(engine, records, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluation.time, "strftime", lambda fmt: "20261207-120000")
    first = evaluate(engine, records[:1], tmp_path, max_new_tokens=2)
    second = evaluate(engine, records[:2], tmp_path, max_new_tokens=2)
    assert first.result_file.name == "20261207-120000.jsonl"
    assert second.result_file.name == "20261207-120000-2.jsonl"
    assert second.summary_file.name == "20261207-120000-2_summary.json"
    assert len(_rows(first.result_file)) == 1 and len(_rows(second.result_file)) == 2


@pytest.mark.parametrize("reply", [
    "<box>[[1.2.3, 0, 10, 10]]</box>",   # used to raise ValueError in float()
    "<box>[[., 0, 10, 10]]</box>",
    "<box>[[0, 0, 10]]</box>",           # three numbers
    "<box>[[0, 0, nan, 10]]</box>",
    "<box>[[0, 0, 1e999, 10]]</box>",
    "<box>[[a, b, c, d]]</box>",
])
def test_a_malformed_box_scores_zero_for_its_row(reply):
    reference = "<ref>square</ref><box>[[0, 0, 10, 10]]</box>"
    assert parse_boxes(reply) == [None]
    assert grounding_iou(reply, reference) == 0.0
    metrics = score([reply, reference], [reference, reference])
    assert metrics["grounding_rows"] == 2 and metrics["grounding_iou"] == pytest.approx(0.5)
    assert metrics["grounding_acc@0.5"] == pytest.approx(0.5)


def test_a_malformed_box_keeps_its_place_among_good_ones():
    reference = "<box>[[0, 0, 10, 10], [20, 20, 30, 30]]</box>"
    assert grounding_iou("<box>[[0, 0, 10, 10], [2.0.0, 20, 30, 30]]</box>", reference) == pytest.approx(0.5)
    assert grounding_iou("<box>[[x, 0, 10, 10], [20, 20, 30, 30]]</box>", reference) == pytest.approx(0.5)


def test_thinking_replies_are_scored_by_their_final_answer():
    reply = "<think>\nThe square is red.\n</think>\n\nred"
    assert final_answer(reply) == "red" and final_answer("red") == "red"
    assert score([reply], ["red"])["exact_match"] == 1.0
    assert score([reply], ["<think>\nother reasoning\n</think>\n\nred"])["exact_match"] == 1.0
