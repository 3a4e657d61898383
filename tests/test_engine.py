"""Generation: answers stop at the template's separator whatever the model's generation config says."""

from __future__ import annotations

import pytest

from vltrain.config import compose_config
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


def test_harmony_replies_stop_at_return_without_the_channel_header(gpt_oss_tokenizer):
    """GPT-OSS: the generation prompt ends with `<|start|>assistant` (as the official chat()); the model writes the
    channel header, which the reply drops; generation stops at <|return|>."""
    from vltrain.data.encode import Encoder
    from vltrain.infer.engine import Engine
    from vltrain.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(gpt_oss_tokenizer, "internvl3_5_gpt_oss")
    engine = Engine(None, Encoder(tokenizer, "internvl3_5_gpt_oss", None, max_tiles=1, max_length=4096))
    assert engine.stop_id == tokenizer.convert_tokens_to_ids("<|return|>") == 200002
    generated = tokenizer.encode("<|channel|>final<|message|> A <ref>cat</ref>.<|return|><|endoftext|>")
    assert engine.decode(generated) == "A <ref>cat</ref>."
    prompt = engine.encoder(Record(query="Hi", response="-"), for_generation=True)
    assert tokenizer.decode(prompt.input_ids).endswith("<|start|>user<|message|>Hi<|end|><|start|>assistant")
