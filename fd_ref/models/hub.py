"""Talking to the Hugging Face hub through huggingface_hub's own configuration and errors.

``HF_ENDPOINT`` (a mirror), ``HF_HUB_OFFLINE``, the proxy variables (``HTTPS_PROXY``, ...) and the token are
all huggingface_hub's: fd-ref never opens its own connection. :func:`hub_unreachable` asks the hub once for
one file's metadata, with a short timeout and no retries, so an offline machine is recognised at once
instead of after huggingface_hub's retries with back-off; :func:`set_offline` then makes every later
call use the local cache only.
"""
from __future__ import annotations

import os
from typing import Optional

PROBE_TIMEOUT_S = 5.0


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:160] if text else ""


def hub_error_message(error: BaseException) -> str:
    """A short reason for a hub failure: offline mode, no connection, not found, not allowed, ..."""
    try:
        from huggingface_hub import errors as hf_errors
    except ImportError:  # pragma: no cover - huggingface_hub comes with timm
        return f"{type(error).__name__}: {_first_line(error)}"
    if isinstance(error, hf_errors.OfflineModeIsEnabled):
        return "huggingface_hub is in offline mode (HF_HUB_OFFLINE is set)"
    if isinstance(error, (hf_errors.RepositoryNotFoundError, hf_errors.GatedRepoError)):
        return f"repository not found or not accessible ({_first_line(error)})"
    if isinstance(error, hf_errors.HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status in (401, 403):
            return f"not allowed (HTTP {status}); log in with `huggingface-cli login` or set HF_TOKEN"
        return f"the hub answered with an error ({_first_line(error)})"
    return f"no connection to {endpoint()} ({type(error).__name__}: {_first_line(error)})"


def endpoint() -> str:
    """The hub address huggingface_hub uses (``HF_ENDPOINT``, or huggingface.co)."""
    try:
        from huggingface_hub import constants
        return constants.ENDPOINT
    except ImportError:  # pragma: no cover
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def is_offline() -> bool:
    try:
        from huggingface_hub import constants
        return bool(constants.is_offline_mode())
    except ImportError:  # pragma: no cover
        return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "")


def hub_unreachable(repo_id: str, filename: str = "config.json",
                    timeout: float = PROBE_TIMEOUT_S) -> Optional[str]:
    """None when the hub, as huggingface_hub is configured, answers a request for ``repo_id/filename``
    (any HTTP answer counts, even 'not found'); otherwise the one-line reason it cannot be reached."""
    if is_offline():
        return "huggingface_hub is in offline mode (HF_HUB_OFFLINE is set)"
    try:
        import huggingface_hub as hf
        from huggingface_hub import errors as hf_errors
    except ImportError:
        return "the huggingface_hub package is not installed"
    try:
        hf.get_hf_file_metadata(hf.hf_hub_url(repo_id, filename), timeout=timeout)
    except hf_errors.HfHubHTTPError:
        return None  # the hub answered (404, 401, ...): it is reachable; the download reports the rest
    except Exception as e:  # noqa: BLE001 - connection, proxy, TLS and timeout errors of the HTTP client
        return hub_error_message(e)
    return None


def set_offline() -> None:
    """Make huggingface_hub use the local cache only from now on (it reads HF_HUB_OFFLINE at import, so the
    environment variable alone would not reach an already imported huggingface_hub)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hf_constants
    except ImportError:  # pragma: no cover
        return
    hf_constants.HF_HUB_OFFLINE = True
