from pathlib import Path

import pytest

SHARED_TOKENIZERS = Path(__file__).resolve().parent.parent.parent / "shared" / "tokenizers"


@pytest.fixture(scope="session")
def shared_tokenizers() -> Path:
    """../shared/tokenizers (real InternLM2, Qwen2, Phi-3, Llama-3 tokenizer folders); skips the test when absent."""
    if not SHARED_TOKENIZERS.is_dir():
        pytest.skip(f"../shared/tokenizers not found: {SHARED_TOKENIZERS}")
    return SHARED_TOKENIZERS
