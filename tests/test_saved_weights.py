"""A full-parameter resume reads the checkpoint's weights into the model in place, tensor by tensor: no second model
is built in any process (`from_pretrained` would build one: 32 GB of fp32 InternVL2-8B per rank)."""

from __future__ import annotations

import types

import pytest
import torch
from transformers import InternVLForConditionalGeneration

from vltrain.config import ConfigError, compose_config
from vltrain.model.load import load_model, load_saved_weights
from vltrain.model.vocab import load_tokenizer_for
from vltrain.train.trainer import VLTrainer


@pytest.fixture(scope="module")
def tiny():
    cfg = compose_config(["dataset=custom", "dataset.train=[unused.jsonl]"])
    return cfg, load_tokenizer_for(cfg.model)


@pytest.fixture
def constructions(monkeypatch):
    """How many InternVL models get built (any way: __init__, from_pretrained) while the block runs."""
    built = []
    init = InternVLForConditionalGeneration.__init__

    def counting_init(self, *args, **kwargs):
        built.append(type(self).__name__)
        init(self, *args, **kwargs)

    monkeypatch.setattr(InternVLForConditionalGeneration, "__init__", counting_init)
    return built


@pytest.mark.parametrize("shard", [None, "200KB"])
def test_weights_are_read_in_place_without_a_second_model(tiny, tmp_path, constructions, shard):
    cfg, tokenizer = tiny
    trained = load_model(cfg.model, tokenizer, torch.float32, seed=1)
    trained.save_pretrained(tmp_path / "ckpt", **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").is_file() == bool(shard)
    model = load_model(cfg.model, tokenizer, torch.float32, seed=2)
    params = {n: p.data_ptr() for n, p in model.named_parameters()}
    before = len(constructions)
    load_saved_weights(model, tmp_path / "ckpt")
    assert len(constructions) == before  # nothing built
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == params  # same storage, written into
    expected = trained.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_the_trainer_resumes_full_weights_in_place(tiny, tmp_path, constructions):
    cfg, tokenizer = tiny
    load_model(cfg.model, tokenizer, torch.float32, seed=1).save_pretrained(tmp_path / "checkpoint-4")
    model = load_model(cfg.model, tokenizer, torch.float32, seed=2)
    trainer = types.SimpleNamespace(model=model, is_fsdp_enabled=False,
                                    accelerator=types.SimpleNamespace(unwrap_model=lambda m: m))
    before = len(constructions)
    VLTrainer._load_from_checkpoint(trainer, str(tmp_path / "checkpoint-4"))
    assert len(constructions) == before
    saved = load_model(cfg.model, tokenizer, torch.float32, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved.state_dict().values()))


def test_a_checkpoint_of_another_model_is_one_clear_error(tiny, tmp_path):
    cfg, tokenizer = tiny
    load_model(cfg.model, tokenizer, torch.float32).save_pretrained(tmp_path / "ckpt")
    import dataclasses

    arch = {**cfg.model.arch, "llm": {**cfg.model.arch["llm"], "num_hidden_layers": 1}}
    smaller = load_model(dataclasses.replace(cfg.model, arch=arch), tokenizer, torch.float32)
    with pytest.raises(ConfigError, match=r"does not hold this model's weights .*unexpected: language_model"):
        load_saved_weights(smaller, tmp_path / "ckpt")
