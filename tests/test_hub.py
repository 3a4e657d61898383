"""Hub downloads: a local folder passes through; gated, missing, offline and unreachable each give one message
saying what to do; tokens come from the argument or the environment. No test touches the network: the download
functions are replaced by fakes that return a folder or raise huggingface_hub's real exception types."""

import importlib.machinery
import os
import subprocess
import sys
import types

import httpx2
import huggingface_hub
import pytest
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

from vltrain.model.hub import HubError, resolve_model_path

REPO = "OpenGVLab/InternVL2-8B"


def http_error(cls, status: int, message: str):
    url = f"https://huggingface.co/api/models/{REPO}"
    return cls(message, response=httpx2.Response(status, request=httpx2.Request("GET", url)))


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A fake Hugging Face Hub: `hub.info` answers model_info (or `hub.error` is raised); snapshot_download
    records its arguments and returns a folder. The cache is an empty HF_HOME in tmp_path."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    state = types.SimpleNamespace(error=None, calls=[], tokens=[], folder=tmp_path / "snapshot",
                                  info=types.SimpleNamespace(sha="a" * 40, siblings=[
                                      types.SimpleNamespace(rfilename=n)
                                      for n in ("config.json", "model.safetensors", "pytorch_model.bin")]))
    state.folder.mkdir()
    real_init = huggingface_hub.HfApi.__init__

    def init(self, *args, token=None, **kwargs):
        state.tokens.append(token)
        real_init(self, *args, token=token, **kwargs)

    def model_info(self, repo_id, **kwargs):
        assert kwargs.get("timeout"), "the first request must have a timeout"
        if state.error is not None:
            raise state.error
        return state.info

    def snapshot_download(repo_id, **kwargs):
        state.calls.append((repo_id, kwargs))
        if kwargs.get("local_files_only"):  # the real one, on the empty cache
            return real_snapshot_download(repo_id, **kwargs)
        return str(state.folder)

    real_snapshot_download = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub.HfApi, "__init__", init)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return state


def test_local_folder_passes_through(tmp_path, hub):
    assert resolve_model_path(str(tmp_path), "hf", None) == tmp_path
    assert resolve_model_path(str(tmp_path), "modelscope", None) == tmp_path
    assert not hub.calls
    with pytest.raises(HubError, match="model.path=/no/such/folder: no such folder"):
        resolve_model_path("/no/such/folder", "hf", None)


def test_download_from_the_hub(hub, monkeypatch):
    assert resolve_model_path(REPO, "hf", None) == hub.folder
    repo_id, kwargs = hub.calls[-1]
    assert repo_id == REPO and kwargs["revision"] == "a" * 40  # the revision model_info resolved
    assert "*.bin" in kwargs["ignore_patterns"]  # safetensors are there: .bin copies are not fetched
    assert kwargs["allow_patterns"] is None
    resolve_model_path(REPO, "hf", None, files=["config.json"])
    assert hub.calls[-1][1]["allow_patterns"] == ["config.json"]
    # tokens: the argument, else HF_TOKEN
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    resolve_model_path(REPO, "hf", None)
    assert hub.tokens[-1] == "hf_env" and hub.calls[-1][1]["token"] == "hf_env"
    resolve_model_path(REPO, "hf", "hf_arg")
    assert hub.tokens[-1] == "hf_arg" and hub.calls[-1][1]["token"] == "hf_arg"


def test_gated_repo(hub):
    hub.error = http_error(GatedRepoError, 403, f"Cannot access gated repo for url .../{REPO}.")
    with pytest.raises(HubError) as e:
        resolve_model_path(REPO, "hf", None)
    message = str(e.value)
    assert "gated" in message and f"https://huggingface.co/{REPO}" in message
    assert "Apply for access" in message and "model.hub_token" in message
    assert "model.path=/path/to/folder" in message


def test_missing_repo(hub):
    hub.error = http_error(RepositoryNotFoundError, 404, "Repository Not Found")
    with pytest.raises(HubError) as e:
        resolve_model_path("OpenGVLab/InternVL2-9B", "hf", None)
    message = str(e.value)
    assert "not a model on the Hugging Face Hub" in message
    assert "https://huggingface.co/OpenGVLab/InternVL2-9B" in message
    assert "model.hub_token" in message and "model.path=/path/to/folder" in message


def test_refused_token(hub):
    hub.error = http_error(HfHubHTTPError, 401, "401 Client Error: Unauthorized (invalid credentials)")
    with pytest.raises(HubError, match="refused the request \\(401: .*token is invalid or has no access.*"
                                       "model.hub_token"):
        resolve_model_path(REPO, "hf", "hf_wrong")
    assert not hub.calls  # not mistaken for "no connection"


def test_no_connection_and_nothing_cached(hub):
    hub.error = httpx2.ConnectError("[Errno -3] Temporary failure in name resolution")
    with pytest.raises(HubError, match="cannot reach the Hugging Face Hub \\(ConnectError: .*no copy in the cache"):
        resolve_model_path(REPO, "hf", None)
    assert hub.calls and all(call[1]["local_files_only"] for call in hub.calls)  # only the cache was looked at


def test_hub_down(hub):
    hub.error = http_error(HfHubHTTPError, 503, "503 Service Unavailable")
    with pytest.raises(HubError, match="cannot reach the Hugging Face Hub \\(HfHubHTTPError: 503"):
        resolve_model_path(REPO, "hf", None)


def test_download_interrupted(hub, monkeypatch):
    def broken(repo_id, **kwargs):
        raise http_error(HfHubHTTPError, 500, "500 Server Error")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", broken)
    with pytest.raises(HubError, match="download from https://huggingface.co/.* failed .*run again to resume"):
        resolve_model_path(REPO, "hf", None)


def test_offline_in_process(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="the hub is offline \\(HF_HUB_OFFLINE=1\\) with no copy of it in the cache"):
        resolve_model_path(REPO, "hf", None)
    assert all(call[1]["local_files_only"] for call in hub.calls)


def test_offline_fails_fast_in_a_fresh_process(tmp_path):
    # the real thing: environment set before huggingface_hub is imported, no fakes, an empty cache
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    env.pop("HF_HUB_CACHE", None)
    # Every socket connection fails loudly in the child: the error must come without one being attempted.
    code = ("import socket\n"
            "def refuse(*args, **kwargs):\n"
            "    raise SystemExit('a network connection was attempted')\n"
            "socket.socket.connect = socket.create_connection = refuse\n"
            "from vltrain.model.hub import resolve_model_path\n"
            f"resolve_model_path({REPO!r}, 'hf', None)\n")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode != 0
    assert "network connection was attempted" not in result.stderr
    assert "HubError" in result.stderr and "offline (HF_HUB_OFFLINE=1)" in result.stderr
    assert str(tmp_path) in result.stderr  # names the cache it looked in


def test_modelscope_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "modelscope", None)  # import fails as if not installed
    with pytest.raises(HubError, match="`pip install modelscope`"):
        resolve_model_path(REPO, "modelscope", None)


def test_modelscope(monkeypatch, tmp_path):
    seen = {}

    def snapshot_download(model_id, **kwargs):
        seen.update(kwargs, model_id=model_id)
        if model_id.endswith("missing"):
            raise ValueError("The request model does not exist!")
        return str(tmp_path)

    class HubApi:
        def login(self, token):
            seen["token"] = token

    modelscope = types.ModuleType("modelscope")
    modelscope.__spec__ = importlib.machinery.ModuleSpec("modelscope", None)
    modelscope.snapshot_download = snapshot_download
    hub_api = types.ModuleType("modelscope.hub.api")
    hub_api.HubApi = HubApi
    monkeypatch.setitem(sys.modules, "modelscope", modelscope)
    monkeypatch.setitem(sys.modules, "modelscope.hub", types.ModuleType("modelscope.hub"))
    monkeypatch.setitem(sys.modules, "modelscope.hub.api", hub_api)
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", "ms_env")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    assert resolve_model_path("OpenGVLab/InternVL2-1B", "modelscope", None) == tmp_path
    assert seen["model_id"] == "OpenGVLab/InternVL2-1B" and seen["token"] == "ms_env"
    assert seen["local_files_only"] is False
    resolve_model_path("OpenGVLab/InternVL2-1B", "modelscope", "ms_arg", files=["config.json"])
    assert seen["token"] == "ms_arg" and seen["allow_patterns"] == ["config.json"]
    with pytest.raises(HubError) as e:
        resolve_model_path("OpenGVLab/missing", "modelscope", None)
    message = str(e.value)
    assert "The request model does not exist!" in message
    assert "https://modelscope.cn/models/OpenGVLab/missing" in message and "MODELSCOPE_API_TOKEN" in message


def test_download_progress_is_plain_lines_off_a_terminal(hub):
    """Under pytest stderr is not a terminal: huggingface_hub gets a tqdm class that prints lines, no bar."""
    import io

    resolve_model_path(REPO, "hf", None)
    bar_class = hub.calls[-1][1]["tqdm_class"]
    stream = io.StringIO()
    bar = bar_class(total=3_000_000, unit="B", unit_scale=True, desc="Downloading bytes", file=stream, interval=0)
    for _ in range(3):
        bar.update(1_000_000)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines[-1].startswith("Downloading bytes: 3.00MB/3.00MB (100%)") and len(lines) >= 2
    assert "\r" not in stream.getvalue()


def test_hub_ids_and_paths_told_apart():
    from vltrain.model.hub import looks_like_hub_id

    for text in ("OpenGVLab/InternVL2-8B", "a/b.c_d-e"):
        assert looks_like_hub_id(text), text
    for text in ("/data/InternVL2-8B", "./x/y", "../x", "~/m", "out/run/ckpt", "InternVL2-8B", "a\\b", ".x/y"):
        assert not looks_like_hub_id(text), text
