"""Original InternVL checkpoints -> native InternVLForConditionalGeneration: config traps, key coverage, logits and
greedy generation against the official code (tests/data/convert_golden.json), the convert command, memory."""

from __future__ import annotations

import copy
import gc
import importlib.util
import json
import shutil
import sys
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoTokenizer, InternVLForConditionalGeneration

from vltrain.cli.convert import main as convert_main
from vltrain.config import SftConfig
from vltrain.data.templates import IGNORE_INDEX, get_template, render, starts_with_bos
from vltrain.model import convert
from vltrain.model.convert import (
    ConversionError,
    convert_config,
    load_original,
    split_grouped_qkv,
)
from vltrain.model.internvl import InternVLPsV1ForConditionalGeneration, model_class
from vltrain.model.original import is_original_layout
from vltrain.model.tokenizer import add_internvl_tokens, load_tokenizer
from vltrain.model.tuning import apply_sft

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = json.loads((ROOT / "tests" / "data" / "convert_golden.json").read_text(encoding="utf-8"))
FAMILIES = list(GOLDEN["families"])
PROMPTS = ["image", "text"]
ATOL = 1e-4


def _load_maker():
    spec = importlib.util.spec_from_file_location("make_tiny_original", ROOT / "scripts" / "make_tiny_original.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def maker():
    return _load_maker()


@pytest.fixture(scope="module")
def originals(tmp_path_factory, shared_tokenizers, maker) -> dict[str, Path]:
    """One tiny original-layout checkpoint per family, exactly the ones the golden values were computed on."""
    root = tmp_path_factory.mktemp("original")
    out = {}
    for family in FAMILIES:
        golden = GOLDEN["families"][family]
        out[family] = maker.make_checkpoint(family, root / family, shared_tokenizers, seed=golden["seed"])
        assert maker.state_dict_digest(out[family]) == golden["weights_digest"], (
            f"{family}: scripts/make_tiny_original.py no longer writes the weights the golden values were made "
            "from; regenerate tests/data/convert_golden.json (scripts/golden)")
    return out


def vltrain_tokenizer(path: Path, family: str):
    tokenizer = load_tokenizer(path, template=GOLDEN["families"][family]["template"])
    add_internvl_tokens(tokenizer)
    return tokenizer


@pytest.fixture(scope="module")
def converted(originals) -> dict[str, InternVLForConditionalGeneration]:
    return {family: load_original(path, vltrain_tokenizer(path, family), torch.float32)
            for family, path in originals.items()}


@pytest.fixture(scope="module")
def cli_outputs(originals, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("converted")
    for family, src in originals.items():
        assert convert_main([f"src={src}", f"dst={root / family}", "dtype=fp32"]) == 0
    return {family: root / family for family in originals}


def model_inputs(prompt: dict) -> dict[str, torch.Tensor]:
    inputs = {"input_ids": torch.tensor([prompt["input_ids"]])}
    if prompt["pixel_values"]:
        spec = prompt["pixel_values"]
        generator = torch.Generator().manual_seed(spec["seed"])
        inputs["pixel_values"] = torch.randn(spec["shape"], generator=generator, dtype=torch.float32)
        assert inputs["pixel_values"].sum().item() == pytest.approx(spec["sum"], abs=1e-2)
    return inputs


def assert_logits_match(model, family: str, prompt_name: str) -> None:
    golden = GOLDEN["families"][family]
    prompt = golden["prompts"][prompt_name]
    with torch.no_grad():
        logits = model(**model_inputs(prompt)).logits[0]  # (L, V)
    expected = prompt["logits"]
    columns = torch.tensor(golden["columns"])
    diff = (logits[:, columns] - torch.tensor(expected["at_columns"])).abs().max().item()
    assert diff <= ATOL, f"{family}/{prompt_name}: logits differ from the official ones by {diff:.2e}"
    torch.testing.assert_close(torch.logsumexp(logits, -1), torch.tensor(expected["logsumexp"]), rtol=0, atol=ATOL)
    torch.testing.assert_close(logits.max(-1).values, torch.tensor(expected["max"]), rtol=0, atol=ATOL)
    assert logits.argmax(-1).tolist() == expected["argmax"]
    top = logits[-1].topk(20)
    assert top.indices.tolist() == expected["last_top20_ids"]
    torch.testing.assert_close(top.values, torch.tensor(expected["last_top20_values"]), rtol=0, atol=ATOL)


# ---- config ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_config_avoids_the_traps(converted, family):
    golden = GOLDEN["families"][family]
    model = converted[family]
    config = model.config
    assert config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert config.image_token_id == golden["image_token_id"]
    assert config.image_seq_length == golden["num_image_token"]
    assert config.text_config.vocab_size == golden["vocab_size"]
    assert config.ps_version == golden["ps_version"]
    assert type(model) is model_class(config)
    assert isinstance(model, InternVLPsV1ForConditionalGeneration) == (golden["ps_version"] == "v1")
    if family == "internlm2-vit6b-ps1":  # config.json omits norm_type and qk_normalization: the 6B defaults apply
        assert config.vision_config.norm_type == "rms_norm" and config.vision_config.use_qk_norm
        assert not config.vision_config.attention_bias


@pytest.mark.parametrize("family", FAMILIES)
def test_every_original_parameter_is_converted(originals, converted, family):
    """load_original raises on a missing or unexpected key; here also: no parameter lost or duplicated."""
    index = json.loads((originals[family] / "model.safetensors.index.json").read_text())
    total = sum(t.numel() for f in dict.fromkeys(index["weight_map"].values())
                for t in load_file(originals[family] / f).values())
    assert sum(p.numel() for p in converted[family].parameters()) == total
    assert not any(p.is_meta for p in converted[family].parameters())


def test_original_vision_defaults_and_ps_version_default():
    original = {"llm_config": {"architectures": ["InternLM2ForCausalLM"], "hidden_size": 64,
                               "num_attention_heads": 4},
                "vision_config": {"hidden_size": 64, "num_attention_heads": 4, "image_size": 448}}
    config = convert_config(original, image_token_id=7)
    vision = config.vision_config
    assert (vision.norm_type, vision.use_qk_norm, vision.attention_bias, vision.num_hidden_layers) == (
        "rms_norm", True, False, 48)
    assert vision.layer_scale_init_value == 0.1
    assert config.ps_version == "v1"  # InternVLChatConfig's default
    assert config.image_token_id == 7 and config.tie_word_embeddings is False
    assert config.image_seq_length == 256 and config.vision_feature_layer == -1
    text = config.text_config
    assert text.model_type == "llama"
    assert text.attention_bias is True and text.mlp_bias is False  # InternLM2's `bias` defaults to True
    assert text.num_key_value_heads == 4 and text.rope_parameters["rope_type"] == "default"


def test_select_layer_downsample_ratio_and_tile_size_come_from_the_checkpoint():
    original = {"llm_config": {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "num_attention_heads": 4},
                "vision_config": {"hidden_size": 64, "num_attention_heads": 4, "image_size": 448, "patch_size": 14},
                "select_layer": -4, "downsample_ratio": 0.25, "force_image_size": 224, "ps_version": "v2"}
    config = convert_config(original, image_token_id=7)
    assert config.vision_feature_layer == -4 and config.downsample_ratio == 0.25
    assert tuple(config.vision_config.image_size) == (224, 224)
    assert config.image_seq_length == (224 // 14) ** 2 // 16  # 16 x 16 patches, 4 x 4 of them per token
    with pytest.raises(ConversionError, match="ps_version: unknown value 'v3'"):
        convert_config({**original, "ps_version": "v3"}, image_token_id=7)


def test_llm_rope_configs():
    def text(llm):
        return convert_config({"llm_config": llm, "vision_config": {}}, 0).text_config

    internlm2 = text({"architectures": ["InternLM2ForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
                      "rope_theta": 1e6, "rope_scaling": {"type": "dynamic", "factor": 2.0}, "bias": False})
    assert internlm2.rope_parameters == {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}
    factors = {"short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    phi3 = {"architectures": ["Phi3ForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
            "max_position_embeddings": 1024, "original_max_position_embeddings": 64, "rope_theta": 1e4}
    su = text({**phi3, "rope_scaling": {"type": "su", **factors}}).rope_parameters
    assert su["rope_type"] == "longrope" and su["long_factor"] == [2.0] * 8
    assert su["original_max_position_embeddings"] == 64 and su["factor"] == 16.0 and "attention_factor" not in su
    yarn = text({**phi3, "rope_scaling": {"type": "yarn", **factors}}).rope_parameters
    assert yarn["attention_factor"] == pytest.approx(0.1 * torch.log(torch.tensor(16.0)).item() + 1.0)
    with pytest.raises(ConversionError, match="rope_scaling"):
        text({**phi3, "rope_scaling": {"type": "ntk", **factors}})
    with pytest.raises(ConversionError, match="architectures"):
        text({"architectures": ["MistralForCausalLM"]})


def test_is_original_layout(originals, cli_outputs, tmp_path):
    assert is_original_layout(originals["qwen2"])
    assert not is_original_layout(cli_outputs["qwen2"])
    assert not is_original_layout(tmp_path / "absent")


# ---- weights ---------------------------------------------------------------------------------------------------


def test_grouped_wqkv_split_on_a_hand_built_tensor():
    heads, kv, d, hidden = 6, 2, 3, 5
    groups = heads // kv
    # row r of KV group g, slot s (0..G-1 = query heads, G = key, G+1 = value), dim i holds g*1000 + s*100 + i
    rows = [[g * 1000 + s * 100 + i] * hidden for g in range(kv) for s in range(groups + 2) for i in range(d)]
    w = torch.tensor(rows, dtype=torch.float32)
    q, k, v = split_grouped_qkv(w, heads, kv, d)
    assert q.shape == (heads * d, hidden) and k.shape == v.shape == (kv * d, hidden)
    # query head h belongs to KV group h // G, slot h % G
    assert q[:, 0].tolist() == [(h // groups) * 1000 + (h % groups) * 100 + i for h in range(heads) for i in range(d)]
    assert k[:, 0].tolist() == [g * 1000 + groups * 100 + i for g in range(kv) for i in range(d)]
    assert v[:, 0].tolist() == [g * 1000 + (groups + 1) * 100 + i for g in range(kv) for i in range(d)]
    bias_q, _, bias_v = split_grouped_qkv(w[:, 0], heads, kv, d)
    assert bias_q.tolist() == q[:, 0].tolist() and bias_v.tolist() == v[:, 0].tolist()
    with pytest.raises(ConversionError, match="wqkv"):
        split_grouped_qkv(w[:-1], heads, kv, d)


def test_grouped_wqkv_split_reproduces_the_original_projections():
    """The original forward: qkv = x wqkv^T viewed as (b, n, KV, G + 2, d); queries are slots :G, key -2, value -1."""
    heads, kv, d, hidden = 8, 2, 4, 16
    g = torch.Generator().manual_seed(0)
    w = torch.randn((heads + 2 * kv) * d, hidden, generator=g)
    x = torch.randn(2, 5, hidden, generator=g)
    qkv = (x @ w.T).view(2, 5, kv, heads // kv + 2, d)
    q_ref = qkv[..., : heads // kv, :].reshape(2, 5, heads * d)
    k_ref, v_ref = qkv[..., -2, :].reshape(2, 5, kv * d), qkv[..., -1, :].reshape(2, 5, kv * d)
    q, k, v = split_grouped_qkv(w, heads, kv, d)
    torch.testing.assert_close(x @ q.T, q_ref)
    torch.testing.assert_close(x @ k.T, k_ref)
    torch.testing.assert_close(x @ v.T, v_ref)
    naive_k = w[heads * d: (heads + kv) * d]  # a contiguous [Q|K|V] split
    assert not torch.allclose(x @ naive_k.T, k_ref)


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_and_unknown_keys_are_one_error(originals, tmp_path):
    ckpt = _copy_checkpoint(originals["qwen2"], tmp_path / "broken")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shard_file = ckpt / index["weight_map"]["mlp1.1.weight"]
    shard = load_file(shard_file)
    del shard["mlp1.1.weight"]
    shard["language_model.model.layers.0.extra.weight"] = torch.zeros(2)
    shard["language_model.model.layers.0.mlp.gate_proj.weight"] = torch.zeros(3, 3)  # wrong shape
    save_file(shard, shard_file, metadata={"format": "pt"})
    with pytest.raises(ConversionError) as error:
        load_original(ckpt, vltrain_tokenizer(ckpt, "qwen2"), torch.float32)
    message = str(error.value)
    assert message.startswith(f"{ckpt}: cannot convert")
    assert "1 missing: model.multi_modal_projector.linear_1.weight" in message
    assert "model.language_model.layers.0.extra.weight" in message
    assert "model.language_model.layers.0.mlp.gate_proj.weight: checkpoint (3, 3)" in message


def test_bin_shards_and_single_file_load_the_same_weights(originals, converted, tmp_path):
    src = originals["internlm2"]
    index = json.loads((src / "model.safetensors.index.json").read_text())
    state = {}
    for f in dict.fromkeys(index["weight_map"].values()):
        state |= load_file(src / f)
    keys = list(state)
    single = _copy_checkpoint(src, tmp_path / "single")
    bins = _copy_checkpoint(src, tmp_path / "bins")
    for folder in (single, bins):
        for f in folder.glob("model*.safetensors*"):
            f.unlink()
    save_file(state, single / "model.safetensors")
    halves = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for name, part in halves.items():
        torch.save({k: state[k] for k in part}, bins / name)
    (bins / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, part in halves.items() for k in part}}))
    reference = converted["internlm2"].state_dict()
    for folder in (single, bins):
        model = load_original(folder, vltrain_tokenizer(folder, "internlm2"), torch.float32)
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, reference[name]), (folder.name, name)


def test_int8_checkpoint_is_dequantised_exactly(originals, maker, tmp_path):
    """A bitsandbytes int8 checkpoint (weight int8 + SCB row absmax, as InternVL-Chat-V1-5-int8 ships): every int8
    weight becomes int8 * SCB / 127, also when its SCB sits in another shard; a lone SCB is an error."""
    src = originals["internlm2"]
    index = json.loads((src / "model.safetensors.index.json").read_text())
    state = {}
    for f in dict.fromkeys(index["weight_map"].values()):
        state |= load_file(src / f)
    saved, expected = maker.int8_state(state)
    scales = {k: v for k, v in saved.items() if k.endswith((".SCB", ".weight_format"))}
    quantised = {k: v for k, v in saved.items() if k not in scales}
    assert sum(t.dtype == torch.int8 for t in quantised.values()) == len(scales) // 2 > 0

    def write(folder: Path, shards: dict[str, dict]) -> Path:
        folder = _copy_checkpoint(src, folder)
        for f in folder.glob("model*.safetensors*"):
            f.unlink()
        for name, part in shards.items():
            save_file(part, folder / name)
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}))
        return folder

    # SCBs in a shard of their own, after the int8 weights: they must wait for each other across shards.
    int8 = write(tmp_path / "int8", {"model-00001-of-00002.safetensors": quantised,
                                     "model-00002-of-00002.safetensors": scales})
    float_copy = write(tmp_path / "float", {"model-00001-of-00001.safetensors": expected})
    got = load_original(int8, vltrain_tokenizer(int8, "internlm2"), torch.float32).state_dict()
    want = load_original(float_copy, vltrain_tokenizer(float_copy, "internlm2"), torch.float32).state_dict()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name

    lone = dict(scales)
    lone["language_model.model.layers.0.extra.SCB"] = torch.ones(3)
    broken = write(tmp_path / "broken", {"model-00001-of-00002.safetensors": quantised,
                                         "model-00002-of-00002.safetensors": lone})
    with pytest.raises(ConversionError, match=r"layers\.0\.extra\.SCB \(int8 tensor without its weight\)"):
        load_original(broken, vltrain_tokenizer(broken, "internlm2"), torch.float32)

    tiled = {**scales, "mlp1.1.weight_format": torch.tensor(2, dtype=torch.uint8)}  # col_turing (bitsandbytes < 0.41.2)
    old_layout = write(tmp_path / "old_layout", {"model-00001-of-00002.safetensors": quantised,
                                                 "model-00002-of-00002.safetensors": tiled})
    with pytest.raises(ConversionError, match=r"model-00002-of-00002\.safetensors: mlp1\.1\.weight_format: int8 "
                                              r"weights in bitsandbytes' GPU tile layout 2"):
        load_original(old_layout, vltrain_tokenizer(old_layout, "internlm2"), torch.float32)


def test_load_holds_one_model_and_one_shard(originals, monkeypatch):
    """Peak tensor bytes while loading: weights assigned so far + shard tensors still alive + the shard read."""
    src = originals["internlm2"]  # 3 shards
    live: list[weakref.ref] = []
    assigned = [0]
    peaks, leftovers = [], []
    read_shard, assign = convert.read_shard, convert._assign

    def counting_read(file):
        gc.collect()
        alive = sum(t.nbytes for t in (ref() for ref in live) if t is not None)
        leftovers.append(alive)
        shard = read_shard(file)
        live.extend(weakref.ref(t) for t in shard.values())
        peaks.append(assigned[0] + alive + sum(t.nbytes for t in shard.values()))
        return shard

    def counting_assign(model, name, tensor):
        assigned[0] += tensor.nbytes
        assign(model, name, tensor)

    monkeypatch.setattr(convert, "read_shard", counting_read)
    monkeypatch.setattr(convert, "_assign", counting_assign)
    model = load_original(src, vltrain_tokenizer(src, "internlm2"), torch.float32)
    model_bytes = sum(p.nbytes for p in model.parameters())
    shard_bytes = [f.stat().st_size for f in sorted(src.glob("model-*.safetensors"))]
    assert len(peaks) == len(shard_bytes) == 3
    assert leftovers == [0, 0, 0]  # the shards read before are freed
    assert assigned[0] == model_bytes
    assert max(peaks) <= model_bytes + max(shard_bytes)
    assert max(peaks) < 2 * model_bytes


# ---- parity with the official code -------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_the_official_model(converted, family, prompt):
    assert_logits_match(converted[family], family, prompt)


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_the_official_model(converted, family, prompt):
    """`generate` with the KV cache, as the official `chat()` ran it (the ps-v1 image prompt is longer than
    max_position_embeddings: there dynamic NTK with a cache differs from a loop without one)."""
    golden = GOLDEN["families"][family]
    expected = golden["prompts"][prompt]["generation"]
    inputs = model_inputs(golden["prompts"][prompt])
    prompt_length = inputs["input_ids"].shape[1]
    out = converted[family].generate(**inputs, attention_mask=torch.ones_like(inputs["input_ids"]),
                                     max_new_tokens=len(expected["new_tokens"]), do_sample=False, use_cache=True,
                                     eos_token_id=golden["eos_token_id"], pad_token_id=golden["eos_token_id"],
                                     return_dict_in_generate=True)
    assert out.sequences[0, prompt_length:].tolist() == expected["new_tokens"]
    assert out.cache.get_seq_length() == out.sequences.shape[1] - 1  # every step but the last went into the cache


# ---- the convert command -----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_cli_output_loads_with_plain_transformers(cli_outputs, family):
    golden = GOLDEN["families"][family]
    dst = cli_outputs[family]
    plain = InternVLForConditionalGeneration.from_pretrained(dst)
    tokenizer = AutoTokenizer.from_pretrained(dst)
    assert len(tokenizer) == golden["vocab_size"]
    assert tokenizer.context_image_token_id == golden["image_token_id"]
    assert tokenizer.convert_tokens_to_ids("<img>") == tokenizer.start_image_token_id
    assert plain.generation_config.eos_token_id == golden["eos_token_id"]
    assert_logits_match(plain, family, "text")
    if golden["ps_version"] == "v1":
        # plain transformers runs the v2 pixel shuffle: wrong for this checkpoint, as save_converted warns
        with pytest.raises(AssertionError):
            assert_logits_match(plain, family, "image")
        config = AutoConfig.from_pretrained(dst)
        assert config.ps_version == "v1"
        assert_logits_match(model_class(config).from_pretrained(dst), family, "image")
    else:
        assert_logits_match(plain, family, "image")


def test_cli_rejects_bad_arguments(originals, tmp_path, capsys):
    with pytest.raises(SystemExit, match="dst: required"):
        convert_main([f"src={originals['qwen2']}"])
    with pytest.raises(SystemExit, match="dtpye: unknown key \\(did you mean 'dtype'\\?\\)"):
        convert_main([f"src={originals['qwen2']}", f"dst={tmp_path}", "dtpye=fp32"])
    with pytest.raises(SystemExit, match="no such folder"):
        convert_main([f"src={tmp_path / 'absent'}", f"dst={tmp_path / 'out'}"])
    with pytest.raises(SystemExit, match="template: unknown template 'chatml'"):
        convert_main([f"src={originals['qwen2']}", f"dst={tmp_path / 'out'}", "template=chatml"])


CONVERSATIONS = [
    # (messages, add_generation_prompt, turns for render, system for render)
    ([{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "<image>\nWhat is it? "},
      {"role": "assistant", "content": " A cat."}, {"role": "user", "content": "Its colour?"}], True,
     [("<image>\nWhat is it? ", " A cat."), ("Its colour?", None)], "Answer briefly."),
    ([{"role": "user", "content": "Hi"}], True, [("Hi", None)], get_template("Hermes-2").default_system),
    ([{"role": "system", "content": ""}, {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}],
     False, [("Q1", "A1")], ""),
]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["internlm2", "qwen2", "phi3"])
def test_chat_template_renders_what_render_renders(cli_outputs, family):
    template = get_template(GOLDEN["families"][family]["template"])
    dst = cli_outputs[family]
    plain = AutoTokenizer.from_pretrained(dst)
    ours = load_tokenizer(dst, template=template.name)
    for messages, generation_prompt, turns, system in CONVERSATIONS:
        text = plain.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        rendered = render(template, ours, turns, system)
        assert text == (plain.bos_token if starts_with_bos(template, ours) else "") + rendered.text
        ids = plain(text, add_special_tokens=False)["input_ids"]
        if family == "phi3":  # phi3-chat trains on the slow sentencepiece ids: "▁" after BOS (save_converted warns)
            assert rendered.input_ids[1] == ours.convert_tokens_to_ids("▁") == 29871
            assert ids == rendered.input_ids[:1] + rendered.input_ids[2:]
        else:
            assert ids == rendered.input_ids


# ---- training the converted models -------------------------------------------------------------------------------


def train_step(model, family: str) -> list[str]:
    """One SGD step on the golden image prompt; returns the names of the trainable tensors that moved."""
    inputs = model_inputs(GOLDEN["families"][family]["prompts"]["image"])
    ids = inputs["input_ids"]
    inputs["labels"] = ids.masked_fill(ids == GOLDEN["families"][family]["image_token_id"], IGNORE_INDEX)
    model.train()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    loss = model(**inputs).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in trainable.values())
    torch.optim.SGD(trainable.values(), lr=1e-2).step()
    return [n for n, p in trainable.items() if not torch.equal(before[n], p)]


@pytest.mark.slow
@pytest.mark.parametrize("sft", ["lora", "full"])
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_and_full_steps_on_converted_models(converted, family, sft):
    model = apply_sft(copy.deepcopy(converted[family]), SftConfig(name=sft))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    moved = set(train_step(model, family))
    if sft == "lora":
        assert trainable and all("lora_" in n for n in trainable)
        # lora_B starts at zero, so only B moves in the first step (A's gradient goes through B)
        assert moved == {n for n in trainable if "lora_B" in n}
    else:
        assert len(trainable) == len(list(model.parameters()))
        # a vision key bias adds the same q.b to every score of a query: softmax ignores it, its gradient is 0
        assert moved == {n for n in trainable if not n.endswith("attention.k_proj.bias")}


def test_cached_conversion_writes_once_per_version(tmp_path, monkeypatch):
    from vltrain.model.load import cached_conversion

    monkeypatch.setenv("VLTRAIN_CONVERTED_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "config.json").write_text("{}", encoding="utf-8")
    calls = []

    def write(dst):
        calls.append(dst)
        (dst / "out.txt").write_text("x", encoding="utf-8")

    first = cached_conversion(src, "base", write)
    assert cached_conversion(src, "base", write) == first and len(calls) == 1 and (first / ".complete").is_file()
    assert first.name.startswith("ckpt-base-") and cached_conversion(src, "", write, salt="t") != first
    (src / "config.json").write_text('{"changed": 1}', encoding="utf-8")
    assert cached_conversion(src, "base", write) != first and len(calls) == 3
