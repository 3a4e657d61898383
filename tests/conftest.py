"""Fixtures shared by the test files: the tokenizers (the embedded tiny one, the real ones in ../shared, GPT-OSS's
built from bpe-openai) and the video decoders."""

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
    from vltrain.model.tokenizer import add_internvl_tokens, load_tokenizer
    from vltrain.model.vocab import EMBEDDED_TOKENIZER

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


@pytest.fixture(scope="session")
def gpt_oss_tokenizer(tmp_path_factory) -> Path:
    """A GPT-OSS tokenizer folder (o200k_base + the harmony special tokens + the InternVL tokens, as
    InternVL3.5-GPT-OSS has them) built once per session by scripts/make_gpt_oss_tokenizer.py from the vocabulary of
    the `bpe-openai` package; skips the test when that package is absent."""
    pytest.importorskip("bpe_openai", reason="the GPT-OSS tokenizer is built from bpe-openai's o200k vocabulary "
                        "(pip install 'vltrain[dev]')")
    import importlib.util

    script = Path(__file__).resolve().parent.parent / "scripts" / "make_gpt_oss_tokenizer.py"
    spec = importlib.util.spec_from_file_location("make_gpt_oss_tokenizer", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_gpt_oss_tokenizer(tmp_path_factory.mktemp("gpt_oss_tokenizer"))


@pytest.fixture(autouse=True, scope="session")
def _encode_cache_in_tmp(tmp_path_factory):
    """Encoded records (`data.encode_cache: null`) go to a temporary folder, never the user's cache; subprocesses
    inherit the variable."""
    import os

    os.environ["VLTRAIN_ENCODE_CACHE"] = str(tmp_path_factory.mktemp("encoded"))
    from vltrain.data import encode_cache

    encode_cache.DEFAULT_ENCODE_CACHE = Path(os.environ["VLTRAIN_ENCODE_CACHE"])


@pytest.fixture(params=["decord", "pyav"])
def backend(request, monkeypatch):
    """Each video test runs once per decoder: decord (skipped when absent), then PyAV with decord hidden."""
    if request.param == "decord":
        pytest.importorskip("decord", reason="decord is optional (pip install 'vltrain[video]')")
    else:
        monkeypatch.setitem(sys.modules, "decord", None)
    return request.param
