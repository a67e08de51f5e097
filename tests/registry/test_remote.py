"""Push/pull through huggingface_hub, with a fake hub (no network): uploaded bytes = the export."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from adapterhub_local.registry import Registry
from adapterhub_local.registry.maintenance import export
from adapterhub_local.registry.remote import pull, push
from tests.peft_factory import save_lora


class FakeHub:
    """Stands in for HfApi + hf_hub_download, keeping uploaded folders in memory."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}

    def create_repo(self, repo_id: str, exist_ok: bool, private: bool) -> None:
        self.repos.setdefault(repo_id, {})

    def upload_folder(self, repo_id: str, folder_path: str, commit_message: str) -> Any:
        self.repos[repo_id] = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        return "fake-commit"

    def download(self, repo_id: str, filename: str, revision: str | None, local_dir: str) -> str:
        data = self.repos[repo_id][filename]  # KeyError = missing file, as the hub would 404
        (Path(local_dir) / filename).write_bytes(data)
        return str(Path(local_dir) / filename)


def test_push_uploads_the_export_and_pull_restores_it(
    llama_registry: Registry, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    save_lora(tiny_llama_dir, tmp_path / "a")
    card = llama_registry.register_adapter("x", tmp_path / "a", "tiny")
    hub = FakeHub()
    assert push(llama_registry, "x", "me/x", api=hub) == "fake-commit"
    exported = export(llama_registry, "x", tmp_path / "exp", with_card=True)
    assert hub.repos["me/x"] == {p.name: p.read_bytes() for p in exported.iterdir()}
    pulled = pull(llama_registry, "me/x", "x-copy", "tiny", download=hub.download)
    assert pulled.files == card.files and pulled.source == "hub:me/x@main"
    shutil.rmtree(exported)
