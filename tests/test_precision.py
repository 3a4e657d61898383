"""`model.dtype=auto` follows the hardware: bf16 only where a GPU computes it natively (compute capability 8.0+),
fp16 on older GPUs (where torch's `is_bf16_supported()` still says yes, through emulation), fp32 on CPU; training
and inference decide with the same function. The GPU is mocked at the level torch reads it from."""

from __future__ import annotations

import logging
import types

import pytest
import torch

from vltrain.model.placement import native_bf16, resolve_dtype


@pytest.fixture
def gpu(monkeypatch):
    """Make torch see one CUDA GPU of the given compute capability; bf16 *emulation* works on it, as on a real
    V100 / T4 (torch's `_check_bf16_tensor_supported` creates a bf16 tensor there successfully)."""

    return lambda major, minor: mock_gpu(monkeypatch, major, minor)


def mock_gpu(patch, major: int, minor: int) -> None:
    patch.setattr(torch.version, "hip", None)
    patch.setattr(torch.cuda, "is_available", lambda: True)
    patch.setattr(torch.cuda, "current_device", lambda: 0)
    patch.setattr(torch.cuda, "get_device_properties",
                  lambda device=None: types.SimpleNamespace(major=major, minor=minor, name="mock"))
    patch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
    patch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)


@pytest.mark.parametrize(("capability", "expected"), [
    ((6, 0), torch.float16),   # P100
    ((7, 0), torch.float16),   # V100
    ((7, 5), torch.float16),   # T4
    ((8, 0), torch.bfloat16),  # A100
    ((8, 9), torch.bfloat16),  # L4 / RTX 4090
    ((9, 0), torch.bfloat16),  # H100
])
def test_auto_is_bf16_only_where_the_gpu_computes_it_natively(gpu, capability, expected):
    gpu(*capability)
    assert resolve_dtype("auto") == expected
    assert native_bf16() == (expected == torch.bfloat16)


def test_torch_reports_emulated_bf16_as_supported_which_auto_does_not_follow(gpu):
    gpu(7, 0)
    assert torch.cuda.is_bf16_supported()  # the trap: V100 "supports" bf16 by emulation
    assert resolve_dtype("auto") == torch.float16


def test_auto_is_fp32_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_dtype("auto") == torch.float32
    assert not native_bf16()


def test_explicit_dtypes_are_kept_and_emulated_bf16_is_named(gpu, caplog):
    gpu(7, 5)
    with caplog.at_level(logging.WARNING, logger="vltrain.model.load"):
        assert resolve_dtype("bf16") == torch.bfloat16
    assert "compute capability 7.5" in caplog.text and "emulates bf16" in caplog.text
    assert resolve_dtype("fp16") == torch.float16
    assert resolve_dtype("fp32") == torch.float32


@pytest.mark.parametrize(("capability", "expected"), [((7, 0), torch.float16), ((8, 0), torch.bfloat16)])
def test_inference_autocasts_an_fp32_model_in_the_same_dtype(gpu, monkeypatch, capability, expected):
    """The engine's generation on a GPU (a full fine-tune's fp32 weights) runs under autocast in the dtype that
    `model.dtype=auto` would load."""
    from vltrain.infer import engine

    gpu(*capability)
    used = []

    class Autocast:
        def __init__(self, device_type, dtype):
            used.append((device_type, dtype))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(engine.torch, "autocast", Autocast)
    monkeypatch.setattr(engine, "_input_device", lambda model: torch.device("cuda", 0))
    model = torch.nn.Linear(2, 2)
    with engine._InferenceMode(model):
        assert not model.training
    assert used == [("cuda", expected)]


@pytest.mark.parametrize(("capability", "expected"), [((7, 5), torch.float16), ((8, 0), torch.bfloat16)])
def test_checkpoints_load_for_inference_in_the_auto_dtype(monkeypatch, tmp_path, capability, expected):
    """`load_checkpoint` (what `vltrain.infer`, evaluation and the server load through) picks the dtype with the
    same function. The GPU is mocked only while the dtype is chosen: the weights themselves load on this CPU."""
    from tests.test_infer import make_lora_checkpoint
    from vltrain.data.demo import write_demo_dataset
    from vltrain.model import load

    ckpt = make_lora_checkpoint(tmp_path / "run", write_demo_dataset(tmp_path / "demo", n_train=4, n_val=2))
    choose = load.resolve_dtype

    def on_the_gpu(name):
        with pytest.MonkeyPatch.context() as patch:
            mock_gpu(patch, *capability)
            return choose(name)

    monkeypatch.setattr(load, "resolve_dtype", on_the_gpu)
    model, _, cfg = load.load_checkpoint(ckpt)
    assert cfg.model.dtype == "auto"
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {expected}
