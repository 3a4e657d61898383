"""The ms-swift Python names, importable from `vltrain`: the documented example runs with only the import changed,
streaming ends on the non-streamed reply, and `import vltrain` stays cheap."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_importing_vltrain_loads_no_torch():
    code = "import sys, vltrain; assert 'torch' not in sys.modules; vltrain.inference; assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_swift_example_with_the_import_changed(tmp_path):
    from PIL import Image

    from vltrain import (
        ModelType,
        get_default_template_type,
        get_model_tokenizer,
        get_template,
        inference,
        inference_stream,
        seed_everything,
    )

    assert ModelType.internvl2_8b == "internvl2-8b" and get_default_template_type(ModelType.internvl2_8b) == (
        "internlm2-chat")
    model_type = "tiny"
    template_type = get_default_template_type(model_type)
    model, tokenizer = get_model_tokenizer(model_type, torch.float32, model_kwargs={"device_map": "auto"})
    model.generation_config.max_new_tokens = 8
    template = get_template(template_type, tokenizer)
    seed_everything(42)
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "red.png")
    images = [str(tmp_path / "red.png")]
    response, history = inference(model, template, "What colour is it?", images=images)
    assert isinstance(response, str) and history == [["What colour is it?", response]]
    steps = list(inference_stream(model, template, "And its shape?", history, images=images))
    again, _ = inference(model, template, "And its shape?", history, images=images)
    assert steps[-1][0] == again
    assert steps[-1][1] == [["What colour is it?", response], ["And its shape?", again]]
    # objects as in training records, PIL images, a system
    reply, _ = inference(model, template, "Where is <ref-object>?", images=[Image.open(images[0])], system="",
                         objects=[{"caption": "the red area", "bbox": [0, 0, 10, 10]}])
    assert isinstance(reply, str)
    with pytest.raises(ValueError, match="unknown template"):
        get_template("internvl3", tokenizer)
    assert get_template("internvl", tokenizer).merge_image_blocks is True
    # InternVL3.5 thinking: the thinking prompt becomes the encoder's default system; only where there is one
    from vltrain.api import _engine
    from vltrain.data.templates import THINKING_SYSTEM

    assert _engine(model, get_template("internvl2_5", tokenizer, thinking=True)).encoder.default_system == \
        THINKING_SYSTEM
    with pytest.raises(ValueError, match="has no thinking mode"):
        get_template("Hermes-2", tokenizer, thinking=True)


def test_swift_from_pretrained_refuses_what_it_cannot_honour(tmp_path):
    from vltrain import Swift
    from vltrain.model.adapters import AdapterError

    with pytest.raises(TypeError, match="unsupported keyword argument.s. adapter_name, revision"):
        Swift.from_pretrained(None, str(tmp_path), revision="main", adapter_name="x")
    with pytest.raises(AdapterError, match="no such folder"):
        Swift.from_pretrained(None, str(tmp_path / "absent"))
    with pytest.raises(AdapterError, match="not a LoRA checkpoint"):
        Swift.from_pretrained(None, str(tmp_path))
