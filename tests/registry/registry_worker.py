"""A registry client process for the concurrency and fault-injection tests: a seeded random mix of
imports, deletes, tags, untags, gc and reads. Prints one JSON line per completed operation; project
errors (a version another worker already deleted …) are expected and reported; anything else is a bug
and escapes with its traceback.

ROOT may be ``s3://bucket/prefix`` (the process's cache: ``$ADAPTERHUB_CACHE``).

Run: ``python -m tests.registry.registry_worker ROOT SOURCE_DIR SEED OPS`` (OPS < 0: loop forever).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from adapterhub_local.errors import AdapterHubError
from adapterhub_local.registry import CardInfo, Registry
from adapterhub_local.registry.maintenance import collect_garbage
from adapterhub_local.registry.objectstore import ObjectStoreRegistry, is_remote

NAMES = ("alpha", "beta", "gamma")


def main(argv: list[str]) -> None:
    root, source, seed, ops = argv[0], Path(argv[1]), int(argv[2]), int(argv[3])
    rng = random.Random(seed)
    registry = ObjectStoreRegistry(root, create=False) if is_remote(root) else Registry.open(root)
    done = 0
    while ops < 0 or done < ops:
        done += 1
        op = rng.choice(("import", "import", "import", "delete", "tag", "untag", "gc", "read"))
        name = rng.choice(NAMES)
        event: dict[str, object] = {"op": op}
        try:
            if op == "import":
                event["ref"] = registry.register_adapter(name, source, "tiny", CardInfo(task=f"s{seed}-{done}")).ref
            elif op == "delete":
                versions = registry.versions_on_disk(name)
                if versions:
                    event["ref"] = registry.delete(f"{name}@{rng.choice(versions)}")
            elif op == "tag":
                event["ref"] = registry.tag(name, rng.choice(("prod", "dev"))).ref
            elif op == "untag":
                registry.untag(name, rng.choice(("prod", "dev")))
            elif op == "gc":
                collect_garbage(registry)
            else:
                for row in registry.list_adapters():
                    registry.check_files(registry.resolve(row.ref))
        except AdapterHubError as exc:
            event["error"] = type(exc).__name__
        print(json.dumps(event), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
