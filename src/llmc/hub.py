"""Whether the Hugging Face hub can be reached, decided fast.

Offline, ``datasets`` and ``transformers`` retry for about 25 s before failing; model and data
loading ask here first so a hub name fails at once with a message that says to pass a local path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator

import datasets

__all__ = ["hub_is_reachable", "hub_offline_mode"]

logger = logging.getLogger("llmc.hub")

_HUB_PROBE_TIMEOUT_S = 3.0
_HUB_PROBE_TTL_S = 60.0
_hub_probe_cache: dict[str, tuple[float, bool]] = {}



def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _offline_by_setting() -> bool:
    """Offline mode as the user configured it.

    The libraries read their environment variables once, at import; reading them again here lets
    a variable set later in the process (a test's monkeypatch, a notebook cell) still count.
    """
    from huggingface_hub import constants as hub_constants

    if any(_env_true(n) for n in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    return bool(hub_constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE)


def hub_is_reachable(timeout: float = _HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether the Hugging Face hub answers, decided within ``timeout`` seconds.

    Why: offline, ``datasets`` and ``transformers`` retry for about 25 s before failing. One HEAD
    request to the hub endpoint with a short timeout answers the same question at once (a DNS
    failure returns in milliseconds; a firewall that drops packets costs ``timeout``). The answer
    is remembered for a minute so a run that loads a model, a tokenizer and a dataset probes once.
    Offline mode set by ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` skips the request.
    """
    if _offline_by_setting():
        return False
    from huggingface_hub import constants as hub_constants
    from huggingface_hub.utils import get_session

    endpoint = hub_constants.ENDPOINT
    cached = _hub_probe_cache.get(endpoint)
    now = time.monotonic()
    if cached is not None and now - cached[0] < _HUB_PROBE_TTL_S:
        return cached[1]
    try:
        get_session().head(endpoint, timeout=timeout)
        reachable = True
    except Exception as error:  # any failure to get an answer means the hub cannot be used
        logger.debug("the Hugging Face hub at %s is unreachable: %s", endpoint, error)
        reachable = False
    _hub_probe_cache[endpoint] = (now, reachable)
    return reachable


@contextlib.contextmanager
def hub_offline_mode() -> Iterator[None]:
    """Make ``datasets`` and ``huggingface_hub`` behave as under ``HF_HUB_OFFLINE=1`` for a while.

    Why: when the probe says the hub is unreachable, a dataset already in the local cache should
    still load, at once, instead of after 25 s of retries. Both libraries read their offline flag
    from a module attribute at call time, so switching those attributes is what the environment
    variable would have done had it been set before import. Not thread-safe; the loaders that use
    it run in the main thread.
    """
    from huggingface_hub import constants as hub_constants

    saved = (
        hub_constants.HF_HUB_OFFLINE,
        datasets.config.HF_HUB_OFFLINE,
        datasets.config.HF_DATASETS_OFFLINE,
    )
    hub_constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
    datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        (
            hub_constants.HF_HUB_OFFLINE,
            datasets.config.HF_HUB_OFFLINE,
            datasets.config.HF_DATASETS_OFFLINE,
        ) = saved
