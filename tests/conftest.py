"""Fixtures shared by the test files: the tokenizers (the embedded tiny one, and the real ones in ../shared) and the
video decoders."""

import functools
import sys
from pathlib import Path

import pytest

SHARED_TOKENIZERS = Path(__file__).resolve().parent.parent.parent / "shared" / "tokenizers"


@pytest.fixture(scope="session")
def shared_tokenizers() -> Path:
    """../shared/tokenizers (real InternLM2, Qwen2, Phi-3, Llama-3 tokenizer folders); skips the test when absent."""
    if not SHARED_TOKENIZERS.is_dir():
        pytest.skip(f"../shared/tokenizers not found: {SHARED_TOKENIZERS}")
    return SHARED_TOKENIZERS


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded tiny tokenizer (the tiny model's) with the InternVL tokens, as the Hermes-2 template loads it."""
    from vltrain.model.load import EMBEDDED_TOKENIZER
    from vltrain.model.tokenizer import add_internvl_tokens, load_tokenizer

    tok = load_tokenizer(EMBEDDED_TOKENIZER, template="Hermes-2")
    add_internvl_tokens(tok)
    return tok


@pytest.fixture(scope="session")
def real_tokenizer(shared_tokenizers):
    """`real_tokenizer(folder, template, extra=())`: the tokenizer of `../shared/tokenizers/<folder>` loaded for
    `template`, with the InternVL tokens (after `extra` special tokens, a stand-in for a checkpoint tokenizer that
    defines them), loaded once per session."""
    from vltrain.model.tokenizer import add_internvl_tokens, load_tokenizer

    @functools.cache
    def load(folder: str, template: str | None, extra: tuple[str, ...] = ()):
        tok = load_tokenizer(shared_tokenizers / folder, template)
        if extra:
            tok.add_tokens(list(extra), special_tokens=True)
        add_internvl_tokens(tok)
        return tok

    return load


@pytest.fixture(autouse=True, scope="session")
def _encode_cache_in_tmp(tmp_path_factory):
    """Encoded records (`data.encode_cache: null`) go to a temporary folder, never the user's cache; subprocesses
    inherit the variable."""
    import os

    os.environ["VLTRAIN_ENCODE_CACHE"] = str(tmp_path_factory.mktemp("encoded"))
    from vltrain.data import dataset

    dataset.DEFAULT_ENCODE_CACHE = Path(os.environ["VLTRAIN_ENCODE_CACHE"])


@pytest.fixture(params=["decord", "pyav"])
def backend(request, monkeypatch):
    """Each video test runs once per decoder: decord (skipped when absent), then PyAV with decord hidden."""
    if request.param == "decord":
        pytest.importorskip("decord", reason="decord is optional (pip install 'vltrain[video]')")
    else:
        monkeypatch.setitem(sys.modules, "decord", None)
    return request.param
