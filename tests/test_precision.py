"""`model.dtype=auto` follows the hardware: bf16 only where a GPU computes it natively (compute capability 8.0+),
fp16 on older GPUs (where torch's `is_bf16_supported()` still says yes, through emulation), fp32 on CPU; training
and inference decide with the same function. The GPU is mocked at the level torch reads it from."""

from __future__ import annotations

import logging
import types

import pytest
import torch

from vltrain.model.load import native_bf16, resolve_dtype


@pytest.fixture
def gpu(monkeypatch):
    """Make torch see one CUDA GPU of the given compute capability; bf16 *emulation* works on it, as on a real
    V100 / T4 (torch's `_check_bf16_tensor_supported` creates a bf16 tensor there successfully)."""

    def make(major: int, minor: int):
        monkeypatch.setattr(torch.version, "hip", None)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device=None: types.SimpleNamespace(major=major, minor=minor, name="mock"))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
        monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)

    return make


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
