"""`export to=original` from a hub-id base (`model.path: OpenGVLab/InternVL2-8B`, the shipped default) brings the
published modeling files (*.py) and the tokenizer from the hub cache, as the weights came. Offline: a Hugging Face
cache laid out in tmp_path (refs + snapshots), and a fake download that serves files from a tmp "remote" folder."""

from __future__ import annotations

import fnmatch
import shutil
import types
from pathlib import Path

import huggingface_hub
import pytest

from tests.test_convert import GOLDEN, _load_maker
from vltrain.cli.export import main as export_main
from vltrain.model.original import is_original_layout

REPO = "OpenGVLab/InternVL2-8B"
SHA = "4f5c2a0e" * 5
CODE = {"modeling_internvl_chat.py": "# published InternVLChatModel\n",
        "configuration_internvl_chat.py": "# published InternVLChatConfig\n",
        "modeling_internlm2.py": "# published InternLM2\n", "conversation.py": "# published templates\n"}


@pytest.fixture(scope="module")
def published(tmp_path_factory, shared_tokenizers) -> Path:
    """What the hub repo holds: a tiny InternLM2 original-layout checkpoint with its tokenizer and modeling files."""
    folder = _load_maker().make_checkpoint("internlm2", tmp_path_factory.mktemp("remote") / "repo", shared_tokenizers,
                                           seed=GOLDEN["families"]["internlm2"]["seed"])
    for name, text in CODE.items():
        (folder / name).write_text(text)
    return folder


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return cache


def _snapshot(cache: Path) -> Path:
    repo = cache / f"models--{REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(SHA)
    return repo / "snapshots" / SHA


def _export(tmp_path, capsys) -> tuple[Path, str]:
    dst = tmp_path / "exported"
    assert export_main(["model=internvl2-8b", f"model.path={REPO}", "to=original", f"dst={dst}"]) == 0
    return dst, capsys.readouterr().out


def test_offline_export_copies_code_and_tokenizer_from_the_hub_cache(published, hub_cache, tmp_path, capsys,
                                                                        monkeypatch):
    """A full download left everything in the cache; offline, the export finds the files there."""
    shutil.copytree(published, _snapshot(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dst, out = _export(tmp_path, capsys)
    assert is_original_layout(dst)
    for name, text in CODE.items():
        assert (dst / name).read_text() == text
    assert (dst / "tokenizer.model").read_bytes() == (published / "tokenizer.model").read_bytes()
    assert "modeling files" not in out  # no note about missing files


def test_export_fetches_what_the_cache_lacks(published, hub_cache, tmp_path, capsys, monkeypatch):
    """Only the weights and config are cached (the modeling files were never fetched): the export asks the hub for
    the code and tokenizer patterns, which the fake download serves from the "remote" folder into the snapshot."""
    snapshot = _snapshot(hub_cache)
    snapshot.mkdir(parents=True)
    for f in published.iterdir():
        if f.suffix in (".safetensors", ".json") and not f.name.startswith("tokenizer"):
            shutil.copyfile(f, snapshot / f.name)
    asked = []

    def model_info(self, repo_id, **kwargs):
        return types.SimpleNamespace(sha=SHA, siblings=[types.SimpleNamespace(rfilename=f.name)
                                                        for f in published.iterdir()])

    def snapshot_download(repo_id, allow_patterns=None, ignore_patterns=None, **kwargs):
        assert repo_id == REPO
        asked.append(allow_patterns)
        for f in published.iterdir():
            wanted = allow_patterns is None or any(fnmatch.fnmatch(f.name, p) for p in allow_patterns)
            ignored = any(fnmatch.fnmatch(f.name, p) for p in ignore_patterns or [])
            if wanted and not ignored and not (snapshot / f.name).exists():
                shutil.copyfile(f, snapshot / f.name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    dst, out = _export(tmp_path, capsys)
    assert any(patterns and "*.py" in patterns for patterns in asked)
    for name, text in CODE.items():
        assert (dst / name).read_text() == text
    assert (dst / "tokenizer.model").is_file() and "modeling files" not in out


def test_unreachable_hub_still_exports_and_says_where_the_code_is(published, hub_cache, tmp_path, capsys,
                                                                  monkeypatch):
    """Offline with the weights cached but no modeling files: the weights are exported, a note names the page."""
    snapshot = _snapshot(hub_cache)
    shutil.copytree(published, snapshot)
    for name in CODE:
        (snapshot / name).unlink()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dst, out = _export(tmp_path, capsys)
    assert is_original_layout(dst) and not list(dst.glob("*.py"))
    assert f"https://huggingface.co/{REPO}" in out
