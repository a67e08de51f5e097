"""Push and pull adapter versions to and from a Hugging Face Hub repo via ``huggingface_hub``.

What is uploaded is exactly the export (``adapter_model.safetensors``, ``adapter_config.json`` and
``card.json``), so a pull followed by import reproduces the version byte for byte.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from adapterhub_local.errors import RemoteError
from adapterhub_local.registry.cards import CARD_FILE, AdapterCard, CardInfo
from adapterhub_local.registry.formats import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from adapterhub_local.registry.maintenance import export
from adapterhub_local.registry.store import Registry


def push(registry: Registry, ref: str, repo_id: str, api: Any = None, private: bool = True) -> str:
    """Upload a version's export to ``repo_id``; returns the commit id (or URL) the hub reports."""
    from huggingface_hub import HfApi

    api = api or HfApi()
    card = registry.resolve(ref)
    with tempfile.TemporaryDirectory() as tmp:
        folder = export(registry, ref, Path(tmp) / "export", with_card=True)
        try:
            api.create_repo(repo_id, exist_ok=True, private=private)
            info = api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                                     commit_message=f"adapterhub push {card.ref}")
        except Exception as exc:
            raise RemoteError(f"push of {card.ref} to {repo_id} failed: {exc}",
                              "check the repo id, your token (`huggingface-cli login`) and the network") from exc
    return str(getattr(info, "oid", None) or info)


def pull(registry: Registry, repo_id: str, name: str, base: str, revision: str | None = None,
         download: Any = None) -> AdapterCard:
    """Download a repo's adapter files and register them as a new version of ``name`` on ``base``."""
    from huggingface_hub import hf_hub_download

    download = download or hf_hub_download
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for fname in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, CARD_FILE):
            try:
                download(repo_id=repo_id, filename=fname, revision=revision, local_dir=str(folder))
            except Exception as exc:
                if fname == CARD_FILE:
                    continue  # a plain PEFT repo has no card
                raise RemoteError(f"cannot download {fname} from {repo_id}@{revision or 'main'}: {exc}",
                                  "check the repo id, revision, token and network") from exc
        # A card that came along keeps its task, metrics and lineage (the import merges it).
        return registry.register_adapter(name, folder, base, CardInfo(source=f"hub:{repo_id}@{revision or 'main'}"))
