"""Where hydrabench reads and writes, and whether it works offline: the one module that reads
the HYDRABENCH_* roots from the environment (each looked up when asked, so a test or a process
that changes one sees it)."""

from __future__ import annotations

import os
import re
import socket
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def slug(text: str) -> str:
    """`text` as one file-name part: a path by its last part, runs of other characters than
    letters, digits, `.`, `_` and `-` as one `-`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(text).name or text).strip("-")


def results_root() -> Path:
    """Records, artifacts, exports and locks (HYDRABENCH_RESULTS, default ./results)."""
    return Path(os.environ.get("HYDRABENCH_RESULTS", "results"))


def reports_root() -> Path:
    """Tables and figures (HYDRABENCH_REPORTS, default ./reports)."""
    return Path(os.environ.get("HYDRABENCH_REPORTS", "reports"))


def cache_root() -> Path:
    """The built tiny model and other rebuildable files (HYDRABENCH_CACHE)."""
    return Path(os.environ.get("HYDRABENCH_CACHE", Path.home() / ".cache" / "hydrabench"))


# lm-eval task YAML (tiny/, offline/) and table specs (tables/); HYDRABENCH_TASKS_DIR replaces
# the shipped tree.
TASKS_DIR = Path(os.environ.get("HYDRABENCH_TASKS_DIR", PACKAGE_ROOT / "tasks"))


def data_dir() -> Path | None:
    """The local copies of the benchmarks' data (HYDRABENCH_DATA_DIR); None when not set."""
    root = os.environ.get("HYDRABENCH_DATA_DIR")
    return Path(root) if root else None


def hub_offline() -> bool:
    """The Hugging Face hub switched off for models (HF_HUB_OFFLINE=1)."""
    return os.environ.get("HF_HUB_OFFLINE") == "1"


def hub_datasets_offline() -> bool:
    """The Hugging Face hub switched off for datasets (HF_DATASETS_OFFLINE=1)."""
    return os.environ.get("HF_DATASETS_OFFLINE") == "1"


def offline_mode() -> bool:
    """Offline when local benchmark copies are configured or the hub is switched off."""
    return data_dir() is not None or hub_offline()


HUB_PROBE_TIMEOUT_S = 3.0


def hub_reachable() -> bool:
    """Whether the Hugging Face hub (HF_ENDPOINT, or the proxy its scheme goes through) takes a
    connection within HUB_PROBE_TIMEOUT_S: asked before work that would otherwise retry the hub
    for a minute and end in a traceback."""
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    proxy = urllib.request.getproxies().get(endpoint.scheme)
    if proxy and not urllib.request.proxy_bypass(endpoint.hostname or ""):
        endpoint = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError:  # no route, no DNS, refused, timed out
        return False
    return True
