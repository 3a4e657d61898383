"""InternVL2.5 / 3 / 3.5 original checkpoints (Qwen2.5, InternLM2.5, Qwen3 with a tied LM head, Qwen3-MoE, GPT-OSS;
the V2_5 vision towers) -> native InternVLForConditionalGeneration: logits and greedy tokens against the official
code (tests/data/convert_later_golden.json, scripts/golden/convert.md), the config.json quirks of the published
files, the experts' layout, the HF-native folder plain transformers loads, and the original layout written back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

from tests.test_convert import _load_maker, model_inputs
from vltrain.cli.convert import main as convert_main
from vltrain.model.convert import ConversionError, convert_config, load_original, save_converted, shard_files
from vltrain.model.export import save_original
from vltrain.model.original import is_original_layout
from vltrain.model.tokenizer import add_internvl_tokens, load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = json.loads((ROOT / "tests" / "data" / "convert_later_golden.json").read_text(encoding="utf-8"))
FAMILIES = list(GOLDEN["families"])
ATOL = 1e-4
LLM_CLASS = {"qwen2_5": "Qwen2ForCausalLM", "internlm2_5": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
             "qwen3_moe": "Qwen3MoeForCausalLM", "gpt_oss": "GptOssForCausalLM"}


@pytest.fixture(scope="module")
def maker():
    return _load_maker()


@pytest.fixture(scope="module")
def originals(tmp_path_factory, shared_tokenizers, maker) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("later")
    out = {}
    for family in FAMILIES:
        golden = GOLDEN["families"][family]
        out[family] = maker.make_checkpoint(family, root / family, shared_tokenizers, seed=golden["seed"])
        assert maker.state_dict_digest(out[family]) == golden["weights_digest"], (
            f"{family}: scripts/make_tiny_original.py no longer writes the weights the golden values were made from")
    return out


def tokenizer_of(path: Path):
    tokenizer = load_tokenizer(path)
    add_internvl_tokens(tokenizer)
    return tokenizer


@pytest.fixture(scope="module")
def converted(originals):
    return {family: load_original(path, tokenizer_of(path), torch.float32) for family, path in originals.items()}


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
    assert logits[-1].topk(20).indices.tolist() == expected["last_top20_ids"]


def greedy(model, family: str, prompt_name: str) -> list[int]:
    golden = GOLDEN["families"][family]
    inputs = model_inputs(golden["prompts"][prompt_name])
    n = len(golden["prompts"][prompt_name]["generation"]["new_tokens"])
    out = model.generate(**inputs, attention_mask=torch.ones_like(inputs["input_ids"]), max_new_tokens=n,
                         do_sample=False, use_cache=True, eos_token_id=golden["eos_token_id"],
                         pad_token_id=golden["eos_token_id"])
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in shard_files(folder):
        out.update(load_file(file))
    return out


# ---- parity with the official code -------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["image", "text"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_the_official_model(converted, family, prompt):
    assert_logits_match(converted[family], family, prompt)


@pytest.mark.parametrize("prompt", ["image", "text"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_the_official_model(converted, family, prompt):
    expected = GOLDEN["families"][family]["prompts"][prompt]["generation"]["new_tokens"]
    assert greedy(converted[family], family, prompt) == expected


# ---- config and weights --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_ids_tie_and_towers_come_from_the_checkpoint(originals, converted, family):
    golden = GOLDEN["families"][family]
    model = converted[family]
    config = model.config
    tokenizer = tokenizer_of(originals[family])
    assert config.image_token_id == golden["image_token_id"] == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert config.text_config.vocab_size == golden["vocab_size"]
    assert type(model.model.language_model).__name__ == LLM_CLASS[family].replace("ForCausalLM", "Model")
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    assert tied is golden["tied_lm_head"] is config.tie_word_embeddings
    vision = json.loads((originals[family] / "config.json").read_text())["vision_config"]
    assert config.vision_config.use_qk_norm is vision["qk_normalization"]
    assert config.vision_config.norm_type == vision["norm_type"]
    index = json.loads((originals[family] / "model.safetensors.index.json").read_text())
    published = sum(t.numel() for f in dict.fromkeys(index["weight_map"].values())
                    for t in load_file(originals[family] / f).values())
    assert sum(p.numel() for p in model.parameters()) == published  # a tied head is counted once on both sides


def test_internvl3_quirks_are_ignored_and_a_vision_moe_is_refused(originals):
    original = json.loads((originals["qwen2_5"] / "config.json").read_text())
    assert original["vision_config"]["use_moe"] is False and original["llm_config"]["eos_token_id"] == 151643
    config = convert_config(original, image_token_id=151667)
    assert config.text_config.eos_token_id == 151643  # kept; generation stops at the template's token
    assert config.text_config.rope_parameters["rope_type"] == "dynamic"
    with pytest.raises(ConversionError, match="use_moe"):
        convert_config({**original, "vision_config": {**original["vision_config"], "use_moe": True}}, 151667)


def test_tie_follows_the_llm_only_for_the_3_5_code():
    llm = {"hidden_size": 64, "num_attention_heads": 4, "tie_word_embeddings": True, "vocab_size": 100}
    qwen2 = convert_config({"llm_config": {**llm, "architectures": ["Qwen2ForCausalLM"]}, "vision_config": {}}, 7)
    qwen3 = convert_config({"llm_config": {**llm, "architectures": ["Qwen3ForCausalLM"]}, "vision_config": {}}, 7)
    assert qwen2.tie_word_embeddings is False  # InternVL 1.5-3's config class forces it off
    assert qwen3.tie_word_embeddings is True and qwen3.text_config.tie_word_embeddings is True


def test_qwen3_moe_experts_are_fused_gate_before_up(originals, converted):
    files = tensors(originals["qwen3_moe"])
    experts = converted["qwen3_moe"].model.language_model.layers[1].mlp.experts
    for e in range(experts.gate_up_proj.shape[0]):
        gate = files[f"language_model.model.layers.1.mlp.experts.{e}.gate_proj.weight"].float()
        up = files[f"language_model.model.layers.1.mlp.experts.{e}.up_proj.weight"].float()
        down = files[f"language_model.model.layers.1.mlp.experts.{e}.down_proj.weight"].float()
        assert torch.equal(experts.gate_up_proj[e], torch.cat([gate, up]))
        assert torch.equal(experts.down_proj[e], down)


def _rewrite(src: Path, dst: Path, change) -> Path:
    shutil.copytree(src, dst)
    state = tensors(dst)
    for f in dst.glob("model*.safetensors*"):
        f.unlink()
    change(state)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_expert_and_a_tied_head_that_differs_are_errors(originals, tmp_path):
    src = originals["qwen3_moe"]
    broken = _rewrite(src, tmp_path / "moe", lambda s: s.pop("language_model.model.layers.0.mlp.experts.3.up_proj.weight"))
    with pytest.raises(ConversionError, match=r"layers\.0\.mlp\.experts gate_up: 7 of 8 expert tensors"):
        load_original(broken, tokenizer_of(broken), torch.float32)
    src = originals["qwen3"]

    def add_head(state):
        state["language_model.lm_head.weight"] = state["language_model.model.embed_tokens.weight"] + 1

    head = _rewrite(src, tmp_path / "head", add_head)
    with pytest.raises(ConversionError, match="lm_head.weight differs from the embeddings"):
        load_original(head, tokenizer_of(head), torch.float32)


# ---- HF-native folders ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_convert_command_output_loads_with_plain_transformers(originals, family, tmp_path):
    """What `vltrain.convert` writes: plain transformers loads it and gives the official logits and greedy tokens;
    config and tokenizer are those of the published -hf folders."""
    golden = GOLDEN["families"][family]
    dst = tmp_path / "hf"
    assert convert_main([f"src={originals[family]}", f"dst={dst}", "dtype=fp32"]) == 0
    config = AutoConfig.from_pretrained(dst)
    assert config.model_type == "internvl" and config.text_config.architectures == [LLM_CLASS[family]]
    assert config.image_token_id == golden["image_token_id"]
    tokenizer = AutoTokenizer.from_pretrained(dst)
    assert tokenizer.context_image_token_id == golden["image_token_id"] and len(tokenizer) == golden["len_tokenizer"]
    plain = AutoModelForImageTextToText.from_pretrained(dst, dtype=torch.float32)
    assert (plain.lm_head.weight is plain.get_input_embeddings().weight) is golden["tied_lm_head"]
    eos = plain.generation_config.eos_token_id
    assert golden["eos_token_id"] in (eos if isinstance(eos, list) else [eos])
    for prompt in ("image", "text"):
        assert_logits_match(plain, family, prompt)
        assert greedy(plain, family, prompt) == golden["prompts"][prompt]["generation"]["new_tokens"]


# ---- the original layout written back --------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_original_layout_round_trips(originals, family, tmp_path):
    src = originals[family]
    tokenizer = tokenizer_of(src)
    model = load_original(src, tokenizer, torch.bfloat16)
    dst = tmp_path / "out"
    save_original(model, tokenizer, dst, GOLDEN["families"][family]["template"], base=src)
    assert is_original_layout(dst)
    exported, published = tensors(dst), tensors(src)
    assert set(exported) == set(published)
    for name, tensor in published.items():
        assert torch.equal(exported[name], tensor), name
    config, source = json.loads((dst / "config.json").read_text()), json.loads((src / "config.json").read_text())
    for key in ("template", "ps_version", "downsample_ratio", "force_image_size", "select_layer", "eos_token_id",
                "pad_token_id"):
        assert config.get(key) == source.get(key), key
    llm, source_llm = config["llm_config"], source["llm_config"]
    for key in ("architectures", "vocab_size", "tie_word_embeddings", "head_dim", "eos_token_id", "num_experts",
                "moe_intermediate_size", "num_local_experts", "layer_types", "sliding_window", "rope_theta"):
        if key in source_llm and not (key == "sliding_window" and not source_llm.get("use_sliding_window", True)):
            assert llm[key] == source_llm[key], key
    for name in ("vocab.json", "merges.txt", "tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        assert (dst / name).is_file() == (src / name).is_file(), name
    back = load_original(dst, tokenizer, torch.float32)
    first = load_original(src, tokenizer, torch.float32)
    inputs = model_inputs(GOLDEN["families"][family]["prompts"]["image"])
    with torch.no_grad():
        assert torch.equal(first(**inputs).logits, back(**inputs).logits)


def test_hf_native_folder_loads_directly_and_exports_to_the_original_layout(originals, converted, tmp_path):
    """A -hf style folder (HF-native config, tied Qwen3) is read by `from_pretrained` and written back in the
    original layout with the files of the published checkpoint (no lm_head for the tied model)."""
    tokenizer = tokenizer_of(originals["qwen3"])
    hf = tmp_path / "hf"
    save_converted(converted["qwen3"], tokenizer, hf, "Hermes-2")
    from vltrain.config import ModelConfig
    from vltrain.model.load import _load_folder

    config = json.loads((hf / "config.json").read_text())
    config["image_token_index"] = config.pop("image_token_id")  # the key early -hf configs used
    (hf / "config.json").write_text(json.dumps(config))
    model = _load_folder(hf, tokenizer, torch.float32, ModelConfig(name="qwen3", path=str(hf)))
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>") == 151671
    save_original(model, tokenizer, tmp_path / "orig", "Hermes-2", "internvl3_5-1b")
    assert set(tensors(tmp_path / "orig")) == set(tensors(originals["qwen3"]))


@pytest.mark.slow
@pytest.mark.parametrize("family, model_type", [("qwen3", "internvl3_5-1b"), ("qwen3_moe", "internvl3_5-30b-a3b"),
                                                ("gpt_oss", "internvl3_5-gpt-oss-20b-a4b")])
def test_merged_lora_on_an_original_base_is_an_hf_native_folder(originals, family, model_type, tmp_path):
    """`export merge_lora=true` on a LoRA checkpoint of an original-layout base: an HF-native folder like the
    published -HF checkpoints (text_config of its LLM class, the tokenizer's image_token_id) that plain
    transformers loads, with the adapter model's logits."""
    from vltrain.config import compose_config, run_config_yaml
    from vltrain.manifest import RUN_CONFIG
    from vltrain.model.export import merge_lora
    from vltrain.model.load import load_model_tokenizer
    from vltrain.model.tuning import apply_sft

    cfg = compose_config([f"model={model_type}", f"model.path={originals[family]}", "model.dtype=fp32",
                          "dataset=custom", "dataset.train=[unused.jsonl]"], run_dir=str(tmp_path))
    model, tokenizer = load_model_tokenizer(cfg.model)
    model = apply_sft(model, cfg.sft_type).eval()  # no LoRA dropout in the reference logits
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    ckpt = tmp_path / "checkpoint-1"
    model.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    (ckpt / RUN_CONFIG).write_text(run_config_yaml(cfg), encoding="utf-8")
    merged = merge_lora(ckpt)
    config = json.loads((merged / "config.json").read_text())
    golden = GOLDEN["families"][family]
    assert config["text_config"]["architectures"] == [LLM_CLASS[family]]
    assert config["image_token_id"] == golden["image_token_id"]
    plain = AutoModelForImageTextToText.from_pretrained(merged, dtype=torch.float32)
    inputs = model_inputs(golden["prompts"]["image"])
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits, model(**inputs).logits, rtol=0, atol=ATOL)


def test_export_command_writes_a_later_type_back(originals, tmp_path):
    from vltrain.cli.export import main as export_main

    dst = tmp_path / "moe"
    args = ["model=internvl3_5-30b-a3b", f"model.path={originals['qwen3_moe']}", "to=original", f"dst={dst}"]
    assert export_main(args) == 0
    config = json.loads((dst / "config.json").read_text())
    assert config["template"] == "internvl2_5" and config["llm_config"]["architectures"] == ["Qwen3MoeForCausalLM"]
    assert set(tensors(dst)) == set(tensors(originals["qwen3_moe"]))


@pytest.mark.parametrize("family", FAMILIES)
def test_vltrain_tokenizer_gives_the_official_ids(originals, family):
    """The golden prompts as the official chat() tokenized them (BOS where the tokenizer adds one: InternLM2.5),
    from vltrain's tokenizer of the checkpoint folder: the image block's ids and every special token match."""
    golden = GOLDEN["families"][family]
    tokenizer = tokenizer_of(originals[family])
    assert len(tokenizer) == golden["len_tokenizer"]
    for prompt in golden["prompts"].values():
        image = "<img>" + "<IMG_CONTEXT>" * golden["num_image_token"] * prompt["tiles"] + "</img>"
        query = prompt["prompt"].replace("<image>", image, 1)
        assert tokenizer(query)["input_ids"] == prompt["input_ids"]
    assert (prompt["input_ids"][0] == tokenizer.bos_token_id) is family.startswith("internlm2")


def test_internvl3_9b_llm_goes_the_internlm2_way():
    """InternVL3-9B's internlm3-8b-instruct is declared as InternLM2ForCausalLM (with InternLM2's config keys):
    grouped wqkv, 32 query heads on 2 KV heads, dynamic rope x6.0, no bias."""
    llm = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "hidden_size": 4096,
           "intermediate_size": 10240, "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 2,
           "bias": False, "rope_theta": 50000000, "rope_scaling": {"type": "dynamic", "factor": 6.0},
           "max_position_embeddings": 32768, "vocab_size": 128512, "tie_word_embeddings": False}
    text = convert_config({"llm_config": llm, "vision_config": {"qk_normalization": False, "norm_type": "layer_norm",
                                                                "qkv_bias": True, "hidden_size": 1024,
                                                                "num_attention_heads": 16}}, 7).text_config
    assert text.model_type == "llama" and (text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (
        32, 2, 128)
    assert text.rope_parameters == {"rope_type": "dynamic", "factor": 6.0, "rope_theta": 50000000.0}
    assert text.attention_bias is False and text.tie_word_embeddings is False
