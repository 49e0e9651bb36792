"""Fast, clear failure for Hugging Face Hub names on machines that cannot reach the Hub.

Without this, transformers and datasets retry for 30-60 s before failing (huggingface_hub's
``http_backoff``: 5 retries, 1+2+4+8+8 s apart). We probe the Hub endpoint once per process (DNS +
TCP connect, a few seconds at most); when it is unreachable, loaders use only the local cache
(``local_files_only``, for every file transformers looks up: see
:func:`preftune.training_model.causal_lm_from_pretrained`) and fail at once with a message that
says how to pass a local path instead. When the Hub is reachable nothing changes.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

__all__ = ["hub_reachable", "offline_mode", "offline_reason", "hub_endpoint", "looks_like_local_path", "local_path_or_name"]


def looks_like_local_path(name: str) -> bool:
    """A model name that can only be a local folder (``./x``, ``/x``, ``~/x``, ``a/b/c``, a backslash):
    a Hub name is ``name`` or ``owner/name``. When no such folder exists, the fix is the path, not the Hub."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def local_path_or_name(name: str) -> str:
    """``name`` as a run records it: a local path (one that exists here, as transformers and the data
    loaders would read it, or a name that can only be a path) as an absolute path, ``~`` expanded and
    symlinks kept; a Hub name unchanged. A relative path means nothing from another working directory."""
    expanded = os.path.expanduser(name)
    if os.path.exists(expanded) or looks_like_local_path(name):
        return os.path.abspath(expanded)
    return name


def offline_mode() -> bool:
    """True when the user asked for offline mode, or the Hub cannot be reached."""
    return offline_reason() is not None


def offline_reason() -> str | None:
    """Why Hub names are read from the local cache only, for messages; None when the Hub is used."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"the Hugging Face Hub is unreachable in offline mode ({var} is set)"
    if not hub_reachable():
        return f"the Hugging Face Hub ({hub_endpoint()}) is unreachable from this machine"
    return None


def hub_endpoint() -> str:
    """The Hub's address: ``HF_ENDPOINT`` (a mirror) or huggingface.co."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """One DNS lookup and TCP connection to :func:`hub_endpoint` (cached for the process)."""
    parsed = urlparse(hub_endpoint())
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, kind, proto, _, addr in infos[:3]:
        try:
            with socket.socket(family, kind, proto) as s:
                s.settimeout(timeout)
                s.connect(addr)
                return True
        except OSError:
            continue
    return False
