"""The Hugging Face hub, for models and datasets named by a hub id.

fedlora's built-in names (models and data shipped in Python packages) never touch the hub, so
importing fedlora does not switch the hub off: a hub id is fetched when the machine is online
and the user has not set offline mode. When it cannot be had, the user gets one line saying
why: offline mode is on, or the hub cannot be reached (probed with one short connection
instead of the libraries' retries), or the hub does not have it.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlsplit

from fedlora.config import ConfigError

TRUE = ("1", "true", "yes", "on")
PROBE_SECONDS = 3.0


def offline_mode() -> bool:
    """The user's offline switch for the hub (models) or for datasets."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    return any(os.environ.get(name, "0").strip().lower() in TRUE for name in names)


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


@functools.cache
def reachable(url: str) -> bool:
    """Whether a TCP connection to the hub opens within ``PROBE_SECONDS`` (once a process)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=PROBE_SECONDS):
            return True
    except OSError:
        return False


def local_only() -> bool:
    """Read hub ids from the local Hugging Face cache only: offline mode, or no hub."""
    return offline_mode() or not reachable(endpoint())


def why_unavailable() -> str:
    """The reason a hub id could not be had, for the user's one line."""
    if offline_mode():
        return (
            "offline mode is on (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE or HF_DATASETS_OFFLINE); "
            "unset it on a machine with internet"
        )
    if not reachable(endpoint()):
        return (
            f"the hub ({endpoint()}) cannot be reached from this machine; on a machine without "
            "internet set HF_HUB_OFFLINE=1 to use copies in the local Hugging Face cache"
        )
    return "the hub does not have it (check the name)"


def dataset_error(name: str, error: Exception | None) -> ConfigError:
    detail = f" ({str(error).splitlines()[0][:200]})" if error is not None and str(error) else ""
    return ConfigError(
        f"data.dataset {name!r} is not a built-in dataset (bbc-news, bbc-news-mc, chatterbot) "
        f"nor a local file, and could not be loaded from the Hugging Face hub: "
        f"{why_unavailable()}{detail}"
    )
