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
TEMPLATES = {"internvl2-1b": "Hermes-2", "internvl2-40b": "Hermes-2",
             "internvl2-4b": "phi3-chat", "mini-internvl-chat-4b-v1_5": "phi3-chat"}
INTERNLM_SYSTEM = "You are an AI assistant whose name is InternLM (书生·浦语)."
PHI3_SYSTEM = "You are an AI assistant whose name is Phi-3."


def test_every_type_has_a_file():
    assert len(MODEL_TYPES) == 11
    for name in MODEL_TYPES:
        assert model_file(name).is_file(), name


@pytest.mark.parametrize("name", MODEL_TYPES)
def test_file_composes_and_validates(name):
    cfg = compose_config([f"model={name}", "dataset=custom", "dataset.train=[x.jsonl]"], run_dir="/tmp/x").model
    assert cfg.name == name
    assert cfg.init == "pretrained" and cfg.path == cfg.hf_id and cfg.hf_id.startswith("OpenGVLab/")
    assert cfg.ms_id and cfg.tokenizer is None and cfg.dtype == "auto" and cfg.attn_impl == "sdpa"
    assert cfg.arch["downsample_ratio"] == 0.5


@pytest.mark.parametrize("name", MODEL_TYPES)
def test_template_system_and_tiles(name):
    cfg = load_model_config(name)
    assert cfg.template == TEMPLATES.get(name, "internlm2-chat")
    if name in V15_TYPES:
        assert cfg.max_tiles == 12
        assert cfg.system == (PHI3_SYSTEM if cfg.template == "phi3-chat" else INTERNLM_SYSTEM)
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
    assert len(lines) == 11
    assert "OpenGVLab/InternVL2-Llama3-76B" in out and "AI-ModelScope/InternVL-Chat-V1-5" in out
