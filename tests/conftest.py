from pathlib import Path

import pytest

SHARED_TOKENIZERS = Path(__file__).resolve().parent.parent.parent / "shared" / "tokenizers"


@pytest.fixture(scope="session")
def shared_tokenizers() -> Path:
    """../shared/tokenizers (real InternLM2, Qwen2, Phi-3, Llama-3 tokenizer folders); skips the test when absent."""
    if not SHARED_TOKENIZERS.is_dir():
        pytest.skip(f"../shared/tokenizers not found: {SHARED_TOKENIZERS}")
    return SHARED_TOKENIZERS


@pytest.fixture(autouse=True, scope="session")
def _encode_cache_in_tmp(tmp_path_factory):
    """Encoded records (`data.encode_cache: null`) go to a temporary folder, never the user's cache; subprocesses
    inherit the variable."""
    import os

    os.environ["VLTRAIN_ENCODE_CACHE"] = str(tmp_path_factory.mktemp("encoded"))
    from vltrain.data import dataset

    dataset.DEFAULT_ENCODE_CACHE = Path(os.environ["VLTRAIN_ENCODE_CACHE"])
