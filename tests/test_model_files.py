"""The model-type YAML files: they validate, their architecture matches the published size, and the template,
system and tile rules per type hold. Models are built on the `meta` device only (no weights, no memory)."""

import subprocess
import sys

import pytest

from vltrain.config import compose_config
from vltrain.model.catalog import (
    MODEL_TYPES,
    PUBLISHED_PARAMS_B,
    count_parameters,
    load_model_config,
    model_file,
)

V15_TYPES = {"internvl-chat-v1_5", "internvl-chat-v1_5-int8", "mini-internvl-chat-2b-v1_5", "mini-internvl-chat-4b-v1_5"}
LATER_TYPES = [n for n in MODEL_TYPES if n.startswith(("internvl2_5-", "internvl3-", "internvl3_5-"))]
TEMPLATES = {"internvl2-1b": "Hermes-2", "internvl2-40b": "Hermes-2",
             "internvl2-4b": "phi3-chat", "mini-internvl-chat-4b-v1_5": "phi3-chat",
             **{n: "internvl2_5" for n in LATER_TYPES}, "internvl3_5-gpt-oss-20b-a4b": "internvl3_5_gpt_oss"}
# max_dynamic_patch / drop_path_rate of the official recipes (2.5 and 3: 2nd-finetune full; 3.5: SFT)
RECIPE = {"internvl2_5-1b": (6, 0.1), "internvl2_5-2b": (6, 0.1), "internvl2_5-4b": (6, 0.1),
          "internvl2_5-8b": (6, 0.1), "internvl2_5-26b": (6, 0.4), "internvl2_5-38b": (6, 0.4),
          "internvl2_5-78b": (6, 0.4), "internvl3-1b": (12, 0.0), "internvl3-2b": (12, 0.0), "internvl3-8b": (12, 0.0),
          "internvl3-9b": (12, 0.0), "internvl3-14b": (12, 0.1), "internvl3-38b": (12, 0.2), "internvl3-78b": (12, 0.4),
          "internvl3_5-1b": (12, 0.0), "internvl3_5-2b": (12, 0.0), "internvl3_5-4b": (12, 0.0),
          "internvl3_5-8b": (12, 0.1), "internvl3_5-14b": (12, 0.1), "internvl3_5-38b": (12, 0.4),
          "internvl3_5-30b-a3b": (12, 0.1), "internvl3_5-241b-a28b": (12, 0.4),
          "internvl3_5-gpt-oss-20b-a4b": (12, 0.1)}
INTERNLM_SYSTEM = "You are an AI assistant whose name is InternLM (书生·浦语)."
PHI3_SYSTEM = "You are an AI assistant whose name is Phi-3."


def test_every_type_has_a_file():
    assert len(MODEL_TYPES) == 11 + 7 + 7 + 9
    assert len(LATER_TYPES) == 23
    for name in MODEL_TYPES:
        assert model_file(name).is_file(), name


@pytest.mark.parametrize("name", MODEL_TYPES)
def test_file_composes_and_validates(name):
    cfg = compose_config([f"model={name}", "dataset=custom", "dataset.train=[x.jsonl]"], run_dir="/tmp/x").model
    assert cfg.name == name
    assert cfg.init == "pretrained" and cfg.path == cfg.hf_id and cfg.hf_id.startswith("OpenGVLab/")
    # GPT-OSS's attention sinks have no sdpa path in transformers
    attn = "eager" if cfg.arch["llm"]["model_type"] == "gpt_oss" else "sdpa"
    assert cfg.ms_id and cfg.tokenizer is None and cfg.dtype == "auto" and cfg.attn_impl == attn
    assert cfg.arch["downsample_ratio"] == 0.5


@pytest.mark.parametrize("name", MODEL_TYPES)
def test_template_system_and_tiles(name):
    cfg = load_model_config(name)
    assert cfg.template == TEMPLATES.get(name, "internlm2-chat")
    if name in V15_TYPES:
        assert cfg.max_tiles == 12
        assert cfg.system == (PHI3_SYSTEM if cfg.template == "phi3-chat" else INTERNLM_SYSTEM)
    elif name in RECIPE:
        assert (cfg.max_tiles, cfg.drop_path_rate) == RECIPE[name]
        assert cfg.system is None
    else:
        assert cfg.max_tiles == 6
        assert cfg.system is None


@pytest.mark.parametrize("name", MODEL_TYPES)
def test_architecture_matches_published_size(name):
    cfg = load_model_config(name)
    vision = cfg.arch["vision"]
    big_vit = vision["hidden_size"] == 3200
    assert vision["image_size"] == 448 and vision["patch_size"] == 14
    assert vision["use_qk_norm"] is big_vit and vision["attention_bias"] is not big_vit
    assert vision["norm_type"] == ("rms_norm" if big_vit else "layer_norm")
    counts = count_parameters(cfg.arch)
    published = PUBLISHED_PARAMS_B[name] * 1e9
    # within 3%, or within the rounding of the published one-decimal figure (InternVL2-1B: 0.938B vs "0.9B")
    assert abs(counts["total"] - published) <= max(0.03 * published, 0.05e9), (name, counts)
    assert counts["total"] == counts["vision"] + counts["projector"] + counts["llm"]


def test_phi3_longrope_lists_have_one_factor_per_rotary_pair():
    for name in ("internvl2-4b", "mini-internvl-chat-4b-v1_5"):
        llm = load_model_config(name).arch["llm"]
        rope = llm["rope_parameters"]
        half_head = llm["hidden_size"] // llm["num_attention_heads"] // 2
        assert rope["rope_type"] == "longrope"
        assert len(rope["short_factor"]) == len(rope["long_factor"]) == half_head


def test_table_command_runs():
    out = subprocess.run([sys.executable, "-m", "vltrain.models"], capture_output=True, text=True, check=True,
                         timeout=120).stdout
    lines = [line for line in out.splitlines() if line.startswith("| `")]
    assert len(lines) == len(MODEL_TYPES)
    assert "OpenGVLab/InternVL3_5-GPT-OSS-20B-A4B-Preview" in out and "qwen3_moe 94x4096" in out
    assert "OpenGVLab/InternVL2-Llama3-76B" in out and "AI-ModelScope/InternVL-Chat-V1-5" in out


@pytest.mark.parametrize("name", LATER_TYPES)
def test_later_types_read_their_llm_as_published(name):
    """The LLM facts the published configs carry and that change the parameter count or the computation."""
    llm = load_model_config(name).arch["llm"]
    kind = llm["model_type"]
    if kind in ("qwen3", "qwen3_moe"):
        assert llm["head_dim"] == 128 and llm["vocab_size"] == 151678  # 151669 Qwen3 tokens + 9 InternVL ones
        assert load_model_config(name).arch["image_token_id"] == 151671
    if kind == "qwen3_moe":
        assert llm["num_experts"] == 128 and llm["num_experts_per_tok"] == 8
    if name.startswith("internvl3-") and kind == "qwen2":  # InternVL3's Qwen2.5 runs with dynamic rope x2.0
        assert llm["rope_parameters"] == {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000000.0}
    if kind == "gpt_oss":
        assert llm["rope_parameters"]["rope_type"] == "yarn" and llm["sliding_window"] == 128


def test_mpo_checkpoints_are_the_same_architectures():
    """-MPO checkpoints publish the same parts as the base model: `model.path` picks them."""
    cfg = compose_config(["model=internvl2_5-8b", "model.path=OpenGVLab/InternVL2_5-8B-MPO", "dataset=custom",
                          "dataset.train=[x.jsonl]"], run_dir="/tmp/x").model
    assert cfg.path == "OpenGVLab/InternVL2_5-8B-MPO" and cfg.arch == load_model_config("internvl2_5-8b").arch
