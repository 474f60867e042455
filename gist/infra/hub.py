"""Decide once, quickly, whether the Hugging Face hub can be reached; without it, go offline.

Without network and without HF_HUB_OFFLINE=1, every hub lookup of huggingface_hub / transformers /
datasets retries for seconds (about 95 s before a quickstart trains). The entry points (scripts/train.py,
scripts/eval.py, scripts/mine_triplets.py) call `offline_unless_reachable()` BEFORE importing those
libraries (they read the variables at import): when HF_HUB_OFFLINE is unset and the hub's host does
not answer within `timeout` seconds, it sets HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 and logs one
warning; models and datasets then come from the local cache. An explicit HF_HUB_OFFLINE (0 or 1) is
left as it is: HF_HUB_OFFLINE=0 keeps the libraries' own retries.

    from gist.infra.hub import offline_unless_reachable
    offline_unless_reachable()   # before `import transformers`
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from urllib.parse import urlparse

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"


def hub_reachable(endpoint: str | None = None, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub's host opens within `timeout` seconds (name lookup included,
    which has no timeout of its own: it runs in a daemon thread that is abandoned if slow)."""
    url = urlparse(endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT)
    host, port = url.hostname or "", url.port or (80 if url.scheme == "http" else 443)
    result: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def offline_unless_reachable(timeout: float = 3.0) -> bool:
    """Set HF_HUB_OFFLINE=1 (and HF_DATASETS_OFFLINE=1) when it is unset and the hub cannot be reached;
    returns whether the process is now offline."""
    if "HF_HUB_OFFLINE" in os.environ:
        return os.environ["HF_HUB_OFFLINE"].lower() in ("1", "true", "yes", "on")
    if hub_reachable(timeout=timeout):
        return False
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    log.warning(
        "the Hugging Face hub (%s) cannot be reached: working offline from the local cache "
        "(HF_HUB_OFFLINE=1); set HF_HUB_OFFLINE=0 to keep trying the hub",
        os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT,
    )
    return True
