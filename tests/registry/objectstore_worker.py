"""A writer process for the object-store tests. Publishes ``COUNT`` versions of ``qa`` from ``SOURCE`` to
the registry at ``URL`` (its own cache ``CACHE``), printing each version's reference and content hash as
one JSON line. With ``COUNT`` < 0 it uploads one version's objects, prints ``uploaded`` and then waits
before its commit — to be killed there by the test (a writer dying mid-publish).

Run: ``python -m tests.registry.objectstore_worker URL CACHE SOURCE COUNT TAG``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from adapterhub_local.registry import CardInfo
from adapterhub_local.registry.cards import AdapterCard
from adapterhub_local.registry.objectstore import ObjectStoreRegistry


class StalledRegistry(ObjectStoreRegistry):
    """Stops between uploading a version's objects and committing its manifest."""

    def commit_manifest(self, card: AdapterCard) -> AdapterCard:
        print(json.dumps({"uploaded": sorted(card.files.values())}), flush=True)
        time.sleep(120)
        return super().commit_manifest(card)


def main(argv: list[str]) -> None:
    url, cache, source, count, tag = argv[0], Path(argv[1]), Path(argv[2]), int(argv[3]), argv[4]
    kind = StalledRegistry if count < 0 else ObjectStoreRegistry
    registry = kind(url, cache=cache, create=False)
    for i in range(max(count, 1)):
        card = registry.register_adapter("qa", source, "tiny", CardInfo(task=f"{tag}-{i}"))
        print(json.dumps({"ref": card.ref, "hash": card.content_hash, "task": card.task}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
