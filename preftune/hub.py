"""Fast, clear failure for Hugging Face Hub names on machines that cannot reach the Hub.

Without this, transformers and datasets retry for 30-60 s before failing. We probe the Hub
endpoint once (DNS + TCP connect, a few seconds at most); when it is unreachable, loaders use
only the local cache (``local_files_only``) and fail at once with a message that says how to
pass a local path instead.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

__all__ = ["hub_reachable", "offline_mode", "looks_like_local_path", "local_path_or_name"]


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
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    return not hub_reachable()


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
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
