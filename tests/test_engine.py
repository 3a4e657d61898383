"""Generation: answers stop at the template's separator whatever the model's generation config says."""

from __future__ import annotations

import pytest

from vltrain.cli import compose_config
from vltrain.data.records import Record
from vltrain.infer.engine import answer_records, exact_match
from vltrain.model.load import load_model_tokenizer, make_encoder


def test_answers_stop_at_the_template_separator(monkeypatch):
    cfg = compose_config(["dataset=custom", "dataset.train=[unused.jsonl]"])
    model, tokenizer = load_model_tokenizer(cfg.model)
    encoder = make_encoder(cfg, model, tokenizer)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = tokenizer.eos_token_id + 1  # as a Trainer re-alignment could leave it
    seen = {}
    real_generate = model.generate

    def generate(**kwargs):
        seen.update(kwargs)
        return real_generate(**kwargs)

    monkeypatch.setattr(model, "generate", generate)
    answers = answer_records(model, encoder, [Record(query="Which colour?", response="red")], max_new_tokens=3)
    gen = seen["generation_config"]
    assert gen.eos_token_id == im_end and gen.do_sample is False
    assert len(answers) == 1 and isinstance(answers[0], str)


@pytest.mark.parametrize("answers,references,expected", [
    (["red", " blue "], ["red", "blue"], 1.0), (["red"], ["Red"], 0.0), ([], [], 0.0)])
def test_exact_match(answers, references, expected):
    assert exact_match(answers, references) == expected
