"""Where a `model.path` comes from: a local folder as is, or a snapshot downloaded from Hugging Face Hub or ModelScope.

Every way a download can fail that a user can fix ends in one `HubError` that says what to do: a gated or unknown
repo (apply for access on the model page, log in or pass `model.hub_token`, or point `model.path` at a local copy),
offline mode or no connection with nothing cached (never a hang: the first request has a bounded timeout, and
huggingface_hub bounds each file request), or the ModelScope client not installed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from vltrain.config import ConfigError
from vltrain.progress import bar_class, is_terminal

HUB_TIMEOUT_S = 15.0
"""Seconds the first request to the hub may take before it counts as no connection."""

# Only the weights the native loader reads: original InternVL repos ship safetensors, some also .bin copies or
# example zips (ms-swift ignores `*.zip` for InternVL2 too).
_NOT_WEIGHTS_WHEN_SAFETENSORS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack"]
_ALWAYS_IGNORED = ["*.zip"]

LOCAL_COPY_ADVICE = "or pass a local copy with `model.path=/path/to/folder`"


class HubError(ConfigError):
    """A model that cannot be found or fetched, phrased as what to do about it."""


def resolve_model_path(path: str, hub: str = "hf", token: str | None = None,
                       files: list[str] | None = None) -> Path:
    """The local folder of `path`: an existing folder is returned as is; anything else is a repo id whose
    snapshot is downloaded (or found in the cache) from `hub` (`hf` or `modelscope`).

    `token`: for gated or private repos; None reads `HF_TOKEN` / `MODELSCOPE_API_TOKEN` (and, for Hugging Face,
    the token saved by `hf auth login`). `files`: glob patterns to fetch only some files (e.g. `["config.json"]`);
    a later full download completes the same snapshot folder.
    """
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if not looks_like_hub_id(path):
        raise HubError(f"model.path={path}: no such folder")
    if hub == "hf":
        return _from_huggingface(path, token or os.environ.get("HF_TOKEN") or None, files)
    if hub == "modelscope":
        return _from_modelscope(path, token or os.environ.get("MODELSCOPE_API_TOKEN") or None, files)
    raise HubError(f"model.hub={hub}: expected 'hf' or 'modelscope'")


def hub_offline() -> bool:
    """`HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) is set: only cached snapshots are used. Read at call time."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def looks_like_hub_id(text: str) -> bool:
    """`owner/name` (what the hubs take), not a path: no leading `/`, `.` or `~`, one `/`, no backslash."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text))


def _access_advice(page: str) -> str:
    return (f"If it is gated, apply for access on the model page {page}; then log in (`hf auth login`) or pass "
            f"`model.hub_token=<token>` (or set HF_TOKEN); {LOCAL_COPY_ADVICE}.")


def _from_huggingface(repo_id: str, token: str | None, files: list[str] | None) -> Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page = f"https://huggingface.co/{repo_id}"
    cache = _hf_cache()  # from the environment now, not when huggingface_hub was imported
    try:
        if hub_offline():
            return _cached_snapshot(
                repo_id, token, files, cache,
                missing=f"model.path={repo_id}: not a local folder, and the hub is offline (HF_HUB_OFFLINE=1) with "
                        f"no copy of it in the cache ({cache}). Download it where there is a connection "
                        f"(`hf download {repo_id}`), unset HF_HUB_OFFLINE, {LOCAL_COPY_ADVICE}.")
        try:
            # Bounded: huggingface_hub's own repo_info call in snapshot_download has no timeout.
            info = HfApi(token=token).model_info(repo_id, timeout=HUB_TIMEOUT_S, files_metadata=False)
        except GatedRepoError:
            raise HubError(
                f"model.path={repo_id}: this model is gated and your account has no access to it (or no token was "
                f"sent). Apply for access on the model page {page}; then log in (`hf auth login`) or pass "
                f"`model.hub_token=<token>` (or set HF_TOKEN); {LOCAL_COPY_ADVICE}."
            ) from None
        except RepositoryNotFoundError:
            raise HubError(
                f"model.path={repo_id}: not a local folder and not a model on the Hugging Face Hub that this token "
                f"can see. Check the id ({page}). {_access_advice(page)}"
            ) from None
        except _network_errors() as e:  # no connection, timeout, proxy, hub down (5xx), or a refused token
            status = getattr(getattr(e, "response", None), "status_code", None)
            if status in (401, 403):
                raise HubError(f"model.path={repo_id}: the Hugging Face Hub refused the request ({status}: "
                               f"{_first_line(e)}); the token is invalid or has no access. "
                               f"{_access_advice(page)}") from None
            return _cached_snapshot(
                repo_id, token, files, cache,
                missing=f"model.path={repo_id}: cannot reach the Hugging Face Hub ({type(e).__name__}: "
                        f"{_first_line(e)}) and there is no copy in the cache ({cache}). Check the connection "
                        f"(proxy, HF_ENDPOINT), {LOCAL_COPY_ADVICE}.")
        names = [s.rfilename for s in info.siblings or []]
        ignore = _ALWAYS_IGNORED + (_NOT_WEIGHTS_WHEN_SAFETENSORS if any(n.endswith(".safetensors") for n in names)
                                    else [])
        # huggingface_hub draws its bars on a terminal; elsewhere it gets plain progress lines
        bars = None if is_terminal() else bar_class()
        return Path(snapshot_download(repo_id, revision=info.sha, token=token, allow_patterns=files,
                                      ignore_patterns=ignore, cache_dir=cache, tqdm_class=bars))
    except HFValidationError as e:
        raise HubError(f"model.path={repo_id}: not a local folder and not a valid hub id ({_first_line(e)})") from None
    except RevisionNotFoundError as e:
        raise HubError(f"model.path={repo_id}: {_first_line(e)}") from None
    except _network_errors() as e:  # during the file downloads
        raise HubError(f"model.path={repo_id}: download from {page} failed ({type(e).__name__}: {_first_line(e)}); "
                       f"run again to resume, {LOCAL_COPY_ADVICE}.") from None


def _cached_snapshot(repo_id: str, token: str | None, files: list[str] | None, cache: str, missing: str) -> Path:
    """The snapshot of `repo_id` already in the cache, without asking the hub; HubError(`missing`) when none is."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, token=token, allow_patterns=files, cache_dir=cache,
                                      local_files_only=True))
    except LocalEntryNotFoundError:
        raise HubError(missing) from None


def _from_modelscope(model_id: str, token: str | None, files: list[str] | None) -> Path:
    try:
        from modelscope import snapshot_download
        from modelscope.hub.api import HubApi
    except ImportError:
        raise HubError(
            f"model.hub=modelscope: the ModelScope client is not installed; `pip install modelscope`, or use "
            f"model.hub=hf, {LOCAL_COPY_ADVICE}."
        ) from None
    page = f"https://modelscope.cn/models/{model_id}"
    try:
        if token:
            HubApi().login(token)
        return Path(snapshot_download(model_id, allow_patterns=files, ignore_patterns=_ALWAYS_IGNORED,
                                      local_files_only=hub_offline()))
    except Exception as e:  # noqa: BLE001 - modelscope raises assorted types (requests, ValueError, NotExistError)
        raise HubError(
            f"model.path={model_id}: could not get it from ModelScope ({type(e).__name__}: {_first_line(e)}). "
            f"ModelScope answers 'The request model does not exist!' both for a wrong id and for a gated model: "
            f"apply for access on the model page {page}, then pass `model.hub_token=<token>` or set "
            f"MODELSCOPE_API_TOKEN (token from https://modelscope.cn/my/myaccesstoken); {LOCAL_COPY_ADVICE}."
        ) from None


def _network_errors() -> tuple[type[BaseException], ...]:
    """What a failed request raises: OSError / HfHubHTTPError, and the HTTP client's transport errors (httpx2 for
    huggingface_hub 2.x, httpx or requests for older ones), which are not OSErrors."""
    import importlib

    from huggingface_hub.errors import HfHubHTTPError

    errors: list[type[BaseException]] = [OSError, HfHubHTTPError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _hf_cache() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or (
        str(Path(os.environ["HF_HOME"]) / "hub") if os.environ.get("HF_HOME") else constants.HF_HUB_CACHE)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
