"""Export: the original InternVLChatModel layout round-trips (same tensors as the published files, same logits after
converting back) for every tiny original family and the tiny native model; the export command's refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_convert import FAMILIES, GOLDEN, _load_maker, model_inputs, vltrain_tokenizer
from vltrain.cli.export import main as export_main
from vltrain.config import compose_config
from vltrain.model.convert import load_original, shard_files, split_grouped_qkv
from vltrain.model.export import fuse_grouped_qkv, original_state_dict, save_original
from vltrain.model.load import load_model_tokenizer
from vltrain.model.original import is_original_layout


@pytest.fixture(scope="module")
def originals(tmp_path_factory, shared_tokenizers) -> dict[str, Path]:
    maker = _load_maker()
    root = tmp_path_factory.mktemp("original")
    return {f: maker.make_checkpoint(f, root / f, shared_tokenizers, seed=GOLDEN["families"][f]["seed"])
            for f in FAMILIES}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in shard_files(folder):
        out.update(load_file(file))
    return out


def test_fuse_grouped_qkv_inverts_the_split():
    w = torch.arange(10 * 4 * 3, dtype=torch.float32).reshape(40, 3)  # 6 heads on 2 KV heads, head_dim 4
    q, k, v = split_grouped_qkv(w, 6, 2, 4)
    assert torch.equal(fuse_grouped_qkv(q, k, v, 6, 2, 4), w)


@pytest.mark.parametrize("family", FAMILIES)
def test_original_layout_round_trips(originals, family, tmp_path):
    """vltrain loads the published layout, writes it back: the same tensors under the same names as the files it
    read, a config that converts to the same model, and equal logits once loaded again."""
    src = originals[family]
    tokenizer = vltrain_tokenizer(src, family)
    model = load_original(src, tokenizer, torch.bfloat16)
    template = GOLDEN["families"][family]["template"]
    dst = tmp_path / "out"
    (src / "modeling_internvl_chat.py").write_text("# the published modeling file\n")
    notes = save_original(model, tokenizer, dst, template, base=src)
    assert is_original_layout(dst) and notes == []
    assert (dst / "modeling_internvl_chat.py").read_text() == "# the published modeling file\n"
    exported, published = _tensors(dst), _tensors(src)
    assert set(exported) == set(published)
    for name, tensor in published.items():
        assert torch.equal(exported[name], tensor), name
    config = json.loads((dst / "config.json").read_text())
    source = json.loads((src / "config.json").read_text())
    for key in ("template", "ps_version", "auto_map", "downsample_ratio", "force_image_size", "select_layer"):
        assert config[key] == source[key], key
    assert config["llm_config"]["architectures"] == source["llm_config"]["architectures"]
    # the config is built from the native one (not copied): converting it back gives the same model
    back = load_original(dst, vltrain_tokenizer(dst, family), torch.float32)
    first = load_original(src, tokenizer, torch.float32)
    assert type(back) is type(first)
    prompt = GOLDEN["families"][family]["prompts"]["image"]
    with torch.no_grad():
        a = first(**model_inputs(prompt)).logits
        b = back(**model_inputs(prompt)).logits
    assert (a - b).abs().max().item() == 0.0


def test_tiny_native_model_exports_to_the_original_layout(tmp_path):
    """A model with no original base folder: config and weights built from the native model; the tokenizer as
    transformers saves it; a note says where the modeling files come from."""
    cfg = compose_config(["dataset=custom", "dataset.train=[unused.jsonl]"])
    model, tokenizer = load_model_tokenizer(cfg.model)
    notes = save_original(model, tokenizer, tmp_path / "out", cfg.model.template, cfg.model.name, max_shard_size="1MB")
    assert any("modeling_internvl_chat.py" in n for n in notes)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["llm_config"]["architectures"] == ["Qwen2ForCausalLM"] and config["template"] == "Hermes-2"
    back = load_original(tmp_path / "out", tokenizer, torch.float32)
    inputs = {"input_ids": torch.tensor([[5, 6, 7] + [back.config.image_token_id] * 64 + [8, 9]]),
              "pixel_values": torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(0))}
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, back(**inputs).logits)
    assert set(original_state_dict(model, "Qwen2ForCausalLM")) == set(_tensors(tmp_path / "out"))


def test_export_command_writes_the_original_layout_and_refuses_bad_requests(originals, tmp_path, capsys):
    src = originals["internlm2-vit6b-ps1"]
    dst = tmp_path / "v15"
    args = ["model=internvl-chat-v1_5", f"model.path={src}", "to=original", f"dst={dst}"]
    assert export_main(args) == 0
    assert is_original_layout(dst)
    # the modeling files and tokenizer files of the base folder come along (none exist in the tiny folder but
    # its tokenizer files do)
    assert (dst / "tokenizer.model").is_file()
    assert export_main(args) == 2  # dst not empty
    assert "overwrite=true" in capsys.readouterr().err
    assert export_main(args + ["overwrite=true"]) == 0
    assert export_main(["to=elsewhere", f"dst={dst}"]) == 2
    assert export_main(["to=hf"]) == 2
    err = capsys.readouterr().err
    assert "to: 'elsewhere'" in err and "merge_lora=true" in err
