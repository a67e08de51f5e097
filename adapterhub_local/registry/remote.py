"""Push and pull adapter versions to and from a Hugging Face Hub repo via ``huggingface_hub``.

What is uploaded is exactly the export (``adapter_model.safetensors``, ``adapter_config.json`` and
``card.json``), so a pull followed by import reproduces the version byte for byte — and keeps its card's
task, metrics and lineage.

Without a network a hub call would retry with back-off for half a minute, logging each retry; instead
the hub endpoint is probed once first (one TCP connect, a few seconds at most) and the failure is one
line. Hub errors are reported on one line too.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from adapterhub_local.errors import RemoteError
from adapterhub_local.registry.cards import CARD_FILE, AdapterCard, CardInfo
from adapterhub_local.registry.formats import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from adapterhub_local.registry.maintenance import export
from adapterhub_local.registry.store import Registry

PROBE_TIMEOUT_S = 5.0
_NETWORK_FIX = "check the network (and HF_ENDPOINT), or import a local directory with `adapterhub import`"


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def check_reachable(timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise :class:`RemoteError` at once if the hub endpoint cannot be reached (or offline mode is on)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise RemoteError("the Hugging Face Hub is disabled (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set)",
                          "unset both, or import a local directory with `adapterhub import`")
    url = urlparse(constants.ENDPOINT)
    host = url.hostname or ""
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        reason = exc.strerror or _one_line(exc) or type(exc).__name__
        raise RemoteError(f"cannot reach {constants.ENDPOINT} ({reason})", _NETWORK_FIX) from exc


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """Silence huggingface_hub's per-retry warnings (the error that ends it all is reported once)."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def push(registry: Registry, ref: str, repo_id: str, api: Any = None, private: bool = True) -> str:
    """Upload a version's export to ``repo_id``; returns the commit id (or URL) the hub reports."""
    card = registry.resolve(ref)
    if api is None:
        from huggingface_hub import HfApi

        check_reachable()
        api = HfApi()
    with tempfile.TemporaryDirectory() as tmp, _quiet_hub():
        folder = export(registry, ref, Path(tmp) / "export", with_card=True)
        try:
            api.create_repo(repo_id, exist_ok=True, private=private)
            info = api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                                     commit_message=f"adapterhub push {card.ref}")
        except Exception as exc:
            raise RemoteError(f"push of {card.ref} to {repo_id} failed: {_one_line(exc)}",
                              "check the repo id, your token (`huggingface-cli login`) and the network") from exc
    return str(getattr(info, "oid", None) or info)


def pull(registry: Registry, repo_id: str, name: str, base: str, revision: str | None = None,
         download: Any = None) -> AdapterCard:
    """Download a repo's adapter files and register them as a new version of ``name`` on ``base``."""
    registry.base(base)  # a wrong base is a local mistake: say so before touching the network
    if download is None:
        from huggingface_hub import hf_hub_download

        check_reachable()
        download = hf_hub_download
    with tempfile.TemporaryDirectory() as tmp, _quiet_hub():
        folder = Path(tmp)
        for fname in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, CARD_FILE):
            try:
                download(repo_id=repo_id, filename=fname, revision=revision, local_dir=str(folder))
            except Exception as exc:
                if fname == CARD_FILE:
                    continue  # a plain PEFT repo has no card
                raise RemoteError(f"cannot download {fname} from {repo_id}@{revision or 'main'}: {_one_line(exc)}",
                                  "check the repo id, revision, token and network") from exc
        # A card that came along keeps its task, metrics and lineage (the import merges it).
        return registry.register_adapter(name, folder, base, CardInfo(source=f"hub:{repo_id}@{revision or 'main'}"))
