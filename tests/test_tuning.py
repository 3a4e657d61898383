"""What trains: default LoRA targets (LLM + projector linears, never vision or LM head) and freezing by part."""


import pytest
import torch

from vltrain.config import SftConfig, compose_config
from vltrain.model.load import load_model_tokenizer
from vltrain.model.tuning import PARTS, apply_sft, part_of, trainable_summary


@pytest.fixture()
def tiny():
    model, _ = load_model_tokenizer(compose_config([], run_dir="/tmp/unused").model)
    return model


def test_default_lora_targets_every_llm_and_projector_linear(tiny):
    linears = [n for n, m in tiny.named_modules() if isinstance(m, torch.nn.Linear)]
    expected = {n for n in linears if n.startswith(("model.language_model.", "model.multi_modal_projector."))}
    lora = apply_sft(tiny, SftConfig(name="lora"))
    matched = {n.removeprefix("base_model.model.") for n, m in lora.named_modules() if hasattr(m, "lora_A")}
    assert matched == expected
    assert "model.multi_modal_projector.linear_1" in matched and "model.multi_modal_projector.linear_2" in matched
    assert not any(n.startswith("model.vision_tower") for n in matched) and "lm_head" not in matched

    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    parts = {part_of(n.removeprefix("base_model.model.").split(".lora_")[0]) for n in trainable}
    assert parts == {"llm", "projector"}
    assert "projector" in trainable_summary(lora) and "vision" not in trainable_summary(lora)


def test_explicit_lora_targets(tiny):
    lora = apply_sft(tiny, SftConfig(name="lora", lora_targets=["q_proj", "v_proj"], lora_rank=4))
    names = {n for n, p in lora.named_parameters() if p.requires_grad}
    # A suffix list also reaches the vision tower's q/v projections: that is what the user asked for.
    assert any("vision_tower" in n for n in names) and all(("q_proj" in n or "v_proj" in n) for n in names)


@pytest.mark.parametrize("frozen", ["vision", "llm", "projector"])
def test_full_freezes_by_part(tiny, frozen):
    model = apply_sft(tiny, SftConfig(name="full", **{f"freeze_{frozen}": True}))
    for name, p in model.named_parameters():
        assert p.requires_grad == (part_of(name) != frozen), name


def test_every_parameter_has_a_part(tiny):
    for name, _ in tiny.named_parameters():
        assert part_of(name) in PARTS


@pytest.mark.slow  # a fresh Python process (so the warning filters are the real ones)
def test_lora_prints_no_future_warning(tmp_path):
    """Wrapping a model with LoRA warns about nothing the user can act on (every FutureWarning is an error here)."""
    import os
    import subprocess
    import sys

    code = ("from vltrain.config import compose_config\n"
            "from vltrain.config import SftConfig\n"
            "from vltrain.model.load import load_model_tokenizer\n"
            "from vltrain.model.tuning import apply_sft\n"
            "model, _ = load_model_tokenizer(compose_config([], run_dir='/tmp/unused').model)\n"
            "apply_sft(model, SftConfig(name='lora'))\n")
    result = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", code], capture_output=True,
                            text=True, cwd=tmp_path, env={**os.environ, "PYTHONWARNINGS": "error::FutureWarning"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Warning" not in result.stderr, result.stderr[-2000:]
