"""Model loading: random builds of every type without files, HF-native and original-layout folders, hub ids,
geometry without weights, attention and 8-bit choices checked before anything loads, drop path."""

import copy
import dataclasses
import importlib.machinery
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from vltrain.config import ConfigError, compose_config
from vltrain.model import placement
from vltrain.model.catalog import MODEL_TYPES, PUBLISHED_PARAMS_B, count_parameters, load_model_config
from vltrain.model.geometry import model_geometry
from vltrain.model.internvl import InternVLPsV1ForConditionalGeneration, drop_path_rates
from vltrain.model.load import load_model, load_model_tokenizer
from vltrain.model.placement import INT8_SKIP_MODULES
from vltrain.model.vocab import load_tokenizer_for

ROOT = Path(__file__).resolve().parent.parent


def tiny(**changes):
    return dataclasses.replace(compose_config([], run_dir="/tmp/unused").model, **changes)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """The tiny random model saved as an HF-native folder (what a full checkpoint or a converted model is)."""
    folder = tmp_path_factory.mktemp("tiny_hf")
    model, tokenizer = load_model_tokenizer(tiny(), dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- random init ---------------------------------------------------------------------------------------------


def test_tokenizer_first_then_model_equals_both_at_once():
    cfg = tiny()
    tokenizer = load_tokenizer_for(cfg)
    model = load_model(cfg, tokenizer, torch.float32, seed=3)
    both, _ = load_model_tokenizer(cfg, torch.float32, seed=3)
    assert same_weights(model, both)
    assert not same_weights(model, load_model(cfg, tokenizer, torch.float32, seed=4))
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def shrunk(name: str):
    """The real type's arch at toy width and depth; vocabulary, image_token_id, norms, rope kind kept."""
    cfg = load_model_config(name)
    arch = copy.deepcopy(cfg.arch)
    arch["vision"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    head_dim = 96 if arch["llm"]["model_type"] == "phi3" else 16  # Phi-3's longrope lists fix head_dim / 2 = 48
    arch["llm"].update(hidden_size=2 * head_dim, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1)
    return dataclasses.replace(cfg, init="random", arch=arch, dtype="fp32")


@pytest.mark.parametrize("name", ["internvl2-1b", "internvl2-2b", "internvl2-4b", "internvl-chat-v1_5",
                                  "internvl2-llama3-76b", "internvl2_5-26b", "internvl3-2b", "internvl3_5-1b",
                                  "internvl3_5-30b-a3b", "internvl3_5-gpt-oss-20b-a4b"])
def test_real_type_builds_offline_without_a_tokenizer(name):
    cfg = shrunk(name)
    model = load_model(cfg, None)
    config = model.config
    assert config.image_token_id == cfg.arch["image_token_id"]
    assert config.text_config.vocab_size == cfg.arch["llm"]["vocab_size"]
    assert config.text_config.model_type == cfg.arch["llm"]["model_type"]
    assert config.vision_config.use_qk_norm is cfg.arch["vision"]["use_qk_norm"]
    assert config.vision_config.norm_type == cfg.arch["vision"]["norm_type"]
    tile, per_tile = model_geometry(cfg)
    assert (tile, per_tile) == (448, 256)
    ids = torch.tensor([[1, 2] + [config.image_token_id] * per_tile + [3, 4]])
    pixels = torch.randn(1, 3, tile, tile)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, logits_to_keep=1)
    assert out.logits.shape == (1, 1, config.text_config.vocab_size)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("name", MODEL_TYPES)
def test_full_size_on_meta_has_the_published_size(name):
    cfg = dataclasses.replace(load_model_config(name), init="random")
    model = load_model(cfg, None, meta=True)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    total = sum(p.numel() for p in model.parameters())
    assert total == count_parameters(cfg.arch)["total"]
    published = PUBLISHED_PARAMS_B[name] * 1e9
    assert abs(total - published) <= max(0.03 * published, 0.05e9)
    # InternVL3-9B's id is only known from its tokenizer: a count on meta embeds no image
    assert model.config.image_token_id == (cfg.arch["image_token_id"] or 0)


def test_tied_lm_head_is_counted_once():
    """InternVL3.5 ties the LM head where its LLM config does: one parameter, counted (and planned) once."""
    cfg = shrunk("internvl3_5-1b")
    tied = dataclasses.replace(cfg, arch={**cfg.arch, "llm": {**cfg.arch["llm"], "tie_word_embeddings": True}})
    untied_model, tied_model = load_model(cfg, None), load_model(tied, None)
    assert tied_model.lm_head.weight is tied_model.get_input_embeddings().weight
    assert untied_model.lm_head.weight is not untied_model.get_input_embeddings().weight
    rows, width = tied_model.get_input_embeddings().weight.shape
    untied, tied_total = (sum(p.numel() for p in m.parameters()) for m in (untied_model, tied_model))
    assert untied - tied_total == rows * width
    assert count_parameters(tied.arch)["total"] == tied_total


def test_arch_and_tokenizer_must_agree():
    cfg = tiny()
    tokenizer = load_tokenizer_for(cfg)
    wrong = dataclasses.replace(cfg, arch={**cfg.arch, "image_token_id": 5})
    with pytest.raises(ConfigError, match="image_token_id 5 .* differs from the tokenizer's <IMG_CONTEXT>"):
        load_model(wrong, tokenizer)
    small = dataclasses.replace(cfg, arch={**cfg.arch, "llm": {**cfg.arch["llm"], "vocab_size": 10}})
    with pytest.raises(ConfigError, match="vocab_size 10 .* smaller than the tokenizer"):
        load_model(small, tokenizer)
    outside = shrunk("internvl2-1b")
    outside = dataclasses.replace(outside, arch={**outside.arch, "image_token_id": 151655})
    with pytest.raises(ConfigError, match="image_token_id 151655 is outside the vocabulary"):
        load_model(outside, None)
    no_id = dataclasses.replace(outside, arch={k: v for k, v in outside.arch.items() if k != "image_token_id"})
    with pytest.raises(ConfigError, match="image_token_id is needed"):
        load_model(no_id, None)


def test_drop_path_rate_reaches_the_vision_layers():
    model, _ = load_model_tokenizer(tiny(drop_path_rate=0.2))
    rates = drop_path_rates(model)
    assert len(rates) == 2 and rates[0] == 0.0 and rates[-1] == pytest.approx(0.2)
    assert drop_path_rates(load_model_tokenizer(tiny())[0]) == [0.0, 0.0]


# ---- attention and 8-bit: checked before anything loads -------------------------------------------------------


def test_attention_choices(monkeypatch):
    model, _ = load_model_tokenizer(tiny(attn_impl="eager"))
    assert model.config._attn_implementation == "eager"
    # validated before the (missing) folder is looked at
    missing = tiny(init="pretrained", path="/nonexistent/model", attn_impl="flash")
    with pytest.raises(ConfigError, match="'flash' is not one of sdpa, eager, flash_attention_2"):
        load_tokenizer_for(missing)
    # transformers' own check (flash_attn >= 2.3.3 installed, and a CUDA GPU) decides; the message says both needs
    monkeypatch.setattr(placement, "is_flash_attn_2_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match=r"no usable flash-attn 2 here; it needs a CUDA GPU and the flash_attn "
                                          r"package >= 2\.3\.3 .*use model.attn_impl=sdpa"):
        load_model_tokenizer(dataclasses.replace(missing, attn_impl="flash_attention_2"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"flash_attention_2: .*needs a CUDA GPU \(none is visible\)"):
        load_model(tiny(attn_impl="flash_attention_2"), None)


def test_int8_without_bitsandbytes_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(placement, "is_bitsandbytes_available", lambda: False)  # transformers' check (with min version)
    with pytest.raises(ConfigError, match=r"bitsandbytes is not installed \(`pip install bitsandbytes`\)"):
        load_tokenizer_for(tiny(load_in_8bit=True, init="pretrained", path="/nonexistent/model"))


def test_int8_where_bitsandbytes_cannot_run(monkeypatch):
    cuda_only = types.ModuleType("bitsandbytes")  # a release before the multi-backend ones
    cuda_only.__version__, cuda_only.supported_torch_devices = "0.42.0", {"cuda"}
    monkeypatch.setitem(sys.modules, "bitsandbytes", cuda_only)
    monkeypatch.setattr(placement, "is_bitsandbytes_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"this bitsandbytes \(0\.42\.0\) cannot run 8-bit layers without a CUDA "
                                          r"GPU \(it supports: cuda\)"):
        load_model(tiny(load_in_8bit=True), None)


needs_bitsandbytes = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                        reason="bitsandbytes not installed (the clear error is tested instead)")


def _int8_layers(model) -> dict[str, bool]:
    import bitsandbytes as bnb

    return {name: isinstance(module, bnb.nn.Linear8bitLt) for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)}


@needs_bitsandbytes
@pytest.mark.parametrize("source", ["hf_folder", "random"])
def test_int8_llm_with_lora_on_top(source, tiny_folder):
    from vltrain.config import SftConfig
    from vltrain.model.tuning import apply_sft

    cfg = tiny(load_in_8bit=True)
    if source == "hf_folder":
        cfg = dataclasses.replace(cfg, init="pretrained", path=str(tiny_folder))
    model, _ = load_model_tokenizer(cfg, torch.float32)
    layers = _int8_layers(model)
    skipped = {n for n in layers if any(n == p or n.startswith(p + ".") for p in INT8_SKIP_MODULES)}
    assert skipped and not any(layers[n] for n in skipped)  # vision, projector, LM head stay exact
    assert all(layers[n] for n in layers if n not in skipped)  # every LLM linear is 8-bit
    peft_model = apply_sft(model, SftConfig())
    image_id = model.config.image_token_id
    ids = torch.tensor([[1, 2] + [image_id] * model.config.image_seq_length + [3, 4, 5]])
    out = peft_model(input_ids=ids, pixel_values=torch.randn(1, 3, 448, 448), labels=ids)
    out.loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


# ---- pretrained folders -------------------------------------------------------------------------------------


def test_hf_native_folder(tiny_folder):
    cfg = tiny(init="pretrained", path=str(tiny_folder))
    model, _ = load_model_tokenizer(cfg, torch.float32)
    reference, _ = load_model_tokenizer(tiny(), torch.float32)
    assert type(model).__name__ == "InternVLForConditionalGeneration"
    assert same_weights(model, reference)
    assert model_geometry(cfg) == model_geometry(tiny()) == (448, 64)


def test_ps_v1_folder_loads_with_its_subclass(tiny_folder, tmp_path):
    folder = tmp_path / "v1"
    folder.mkdir()
    for f in tiny_folder.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "ps_version": "v1"}))
    model, _ = load_model_tokenizer(tiny(init="pretrained", path=str(folder)))
    assert isinstance(model, InternVLPsV1ForConditionalGeneration)
    (folder / "config.json").write_text(json.dumps({**config, "ps_version": "v3"}))
    with pytest.raises(ConfigError, match="unknown ps_version 'v3'"):
        load_model_tokenizer(tiny(init="pretrained", path=str(folder)))


def test_folder_that_is_not_internvl(tiny_folder, tmp_path):
    for f in tiny_folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "vocab_size": 10}))
    cfg = tiny(init="pretrained", path=str(tmp_path))
    with pytest.raises(ConfigError, match="model_type 'qwen2' is not an InternVL model"):
        load_model_tokenizer(cfg)
    with pytest.raises(ConfigError, match="not an InternVL config"):
        model_geometry(cfg)


def _make_tiny_original():
    if "make_tiny_original" not in sys.modules:
        spec = importlib.util.spec_from_file_location("make_tiny_original", ROOT / "scripts" / "make_tiny_original.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules["make_tiny_original"]


@pytest.mark.parametrize("family,template,image_token_id,v1,eos", [
    ("internlm2", "internlm2-chat", 92546, False, 92542),  # <|im_end|>
    ("internlm2-vit6b-ps1", "internlm2-chat", 92546, True, 92542),
    ("qwen2", "Hermes-2", 151648, False, 151645),
    ("llama", "internlm2-chat", 128258, False, 128001),  # base Llama-3 has no <|im_end|>: its EOS <|end_of_text|>
])
def test_original_layout_folder(family, template, image_token_id, v1, eos, shared_tokenizers, tmp_path):
    from vltrain.model.convert import load_original

    folder = _make_tiny_original().make_checkpoint(family, tmp_path / family, shared_tokenizers)
    assert not (folder / "tokenizer.json").exists() or family in ("qwen2", "llama")
    cfg = tiny(init="pretrained", path=str(folder), template=template)
    model, tokenizer = load_model_tokenizer(cfg, torch.float32)
    assert isinstance(model, InternVLPsV1ForConditionalGeneration) is v1
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>") == image_token_id
    assert model.generation_config.eos_token_id == eos
    assert same_weights(model, load_original(folder, tokenizer, torch.float32))
    original = json.loads((folder / "config.json").read_text())
    expected_tile = original.get("force_image_size") or original["vision_config"]["image_size"]
    assert model_geometry(cfg) == (expected_tile, model.config.image_seq_length)
    assert model.config.vision_config.image_size[0] == expected_tile


@needs_bitsandbytes
def test_original_int8_checkpoint_loads_in_8bit_with_lora_on_top(shared_tokenizers, tmp_path):
    """InternVL-Chat-V1-5-int8's layout (int8 weights + SCB): dequantised while converting, then quantised again by
    `model.load_in_8bit` to the very int8 values stored (InternLM2's wqkv rows regrouped into q/k/v); LoRA trains."""
    from safetensors.torch import load_file

    from vltrain.config import SftConfig
    from vltrain.model.convert import split_grouped_qkv
    from vltrain.model.tuning import apply_sft

    maker = _make_tiny_original()
    folder = maker.make_int8_copy(maker.make_checkpoint("internlm2-vit6b-ps1", tmp_path / "src", shared_tokenizers),
                                  tmp_path / "int8")
    stored = {}
    for shard in folder.glob("model-*.safetensors"):
        stored |= load_file(shard)
    cfg = tiny(init="pretrained", path=str(folder), template="internlm2-chat", load_in_8bit=True)
    model, _ = load_model_tokenizer(cfg, torch.float32)
    assert isinstance(model, InternVLPsV1ForConditionalGeneration)
    layers = _int8_layers(model)
    skipped = {n for n in layers if any(n == p or n.startswith(p + ".") for p in INT8_SKIP_MODULES)}
    assert skipped and not any(layers[n] for n in skipped)
    assert all(layers[n] for n in layers if n not in skipped)

    llm = json.loads((folder / "config.json").read_text())["llm_config"]
    heads, kv = llm["num_attention_heads"], llm["num_key_value_heads"]
    head_dim = llm["hidden_size"] // heads
    for i, layer in enumerate(model.model.language_model.layers):
        original = f"language_model.model.layers.{i}."
        wqkv, scb = stored[original + "attention.wqkv.weight"], stored[original + "attention.wqkv.SCB"]
        assert wqkv.dtype == torch.int8
        for proj, q, s in zip((layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                              split_grouped_qkv(wqkv, heads, kv, head_dim),
                              split_grouped_qkv(scb, heads, kv, head_dim)):
            assert proj.weight.dtype == torch.int8 and torch.equal(proj.weight.data, q)
            torch.testing.assert_close(proj.weight.SCB, s, rtol=1e-3, atol=0)  # bitsandbytes keeps it in fp16
        assert torch.equal(layer.mlp.down_proj.weight.data, stored[original + "feed_forward.w2.weight"])

    peft_model = apply_sft(model, SftConfig())
    tile, per_tile = model_geometry(cfg)
    image_id = model.config.image_token_id
    ids = torch.tensor([[1, 2] + [image_id] * per_tile + [3, 4, 5]])
    lora = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    before = {n: p.detach().clone() for n, p in lora.items()}
    peft_model.train()
    loss = peft_model(input_ids=ids, pixel_values=torch.randn(1, 3, tile, tile),
                      labels=ids.masked_fill(ids == image_id, -100)).loss
    assert torch.isfinite(loss)
    loss.backward()
    torch.optim.SGD(lora.values(), lr=1e-2).step()
    moved = {n for n, p in lora.items() if not torch.equal(before[n], p)}
    assert moved == {n for n in lora if "lora_B" in n}  # lora_B starts at zero: only B moves in the first step


# ---- hub ids -------------------------------------------------------------------------------------------------


def test_hub_id_fetches_tokenizer_files_first_then_the_weights(tiny_folder, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    info = types.SimpleNamespace(sha="0123456789abcdef0123456789abcdef01234567",
                                 siblings=[types.SimpleNamespace(rfilename=f.name) for f in tiny_folder.iterdir()])

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs.get("allow_patterns")))
        return str(tiny_folder)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo_id, **kw: info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cfg = tiny(init="pretrained", path="someone/tiny-internvl")
    tokenizer = load_tokenizer_for(cfg)
    assert calls[-1][0] == "someone/tiny-internvl" and "tokenizer*" in calls[-1][1]
    assert model_geometry(cfg) == (448, 64)
    assert calls[-1][1] == ["config.json"]
    model = load_model(cfg, tokenizer, torch.float32)
    assert calls[-1][1] is None  # the whole snapshot for the weights
    assert same_weights(model, load_model_tokenizer(tiny(), torch.float32)[0])
