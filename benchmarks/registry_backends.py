"""Registry back ends side by side: import and load latency of the same adapters in a local registry and
in a registry on object storage (``s3://``, moto's S3-compatible server on 127.0.0.1, started here).

For each back end, ``--versions`` imports of the same LoRA directory (every import runs the full gate,
hashes every file and publishes), then loads of each version (``load_adapter``: resolve, verify every
file's sha256, read the tensors) by a new client with an empty cache — its open (for S3: list, download and
check the base and every version, install them in the cache), its first load, and a second load. The
store is local, so the S3 figures are the protocol's cost (requests, conditional create, hashing, copies),
not a network's. A new S3 client syncs on open: it downloads the base and every version it lacks
(once; later loads hit its cache). The model is a random-weight Llama built on the spot (no downloads).

    .venv/bin/python benchmarks/registry_backends.py                  # about half a minute on 2 CPU cores
    .venv/bin/python benchmarks/registry_backends.py --hidden 1024 --rank 64

Writes ``benchmarks/results/registry_backends.json`` and ``.md`` (or ``--out DIR``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapterhub_local.registry import CardInfo, Registry  # noqa: E402
from adapterhub_local.registry.objectstore import ObjectStoreRegistry  # noqa: E402
from tests.conftest import make_tiny_llama  # noqa: E402
from tests.peft_factory import save_lora  # noqa: E402
from tests.registry import s3_kit  # noqa: E402


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return (time.perf_counter() - start) * 1000


def measure(make: Callable[[str], Registry], base_dir: Path, lora: Path, versions: int) -> dict[str, float]:
    writer = make("writer")
    add_base_ms = timed(lambda: writer.add_base("tiny", str(base_dir)))
    def register(i: int) -> Callable[[], object]:
        return lambda: writer.register_adapter("qa", lora, "tiny", CardInfo(task=f"t{i}"))

    imports = [timed(register(i)) for i in range(versions)]
    opens, first, warm = [], [], []
    for i in range(1, versions + 1):
        start = time.perf_counter()
        reader = make(f"reader{i}")  # a new client, empty cache
        opens.append((time.perf_counter() - start) * 1000)
        first.append(timed(partial(reader.load_adapter, f"qa@{i}", base="tiny")))
        warm.append(timed(partial(reader.load_adapter, f"qa@{i}", base="tiny")))
    return {"add_base_ms": add_base_ms, "import_ms": statistics.median(imports),
            "open_new_client_ms": statistics.median(opens), "load_first_ms": statistics.median(first),
            "load_warm_ms": statistics.median(warm), "base_bytes": sum(
                p.stat().st_size for p in base_dir.iterdir() if p.is_file()),
            "adapter_bytes": (lora / "adapter_model.safetensors").stat().st_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--versions", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name, s3_kit.s3_server() as endpoint:
        tmp = Path(tmp_name)
        os.environ.update(s3_kit.environment(endpoint))
        base_dir = make_tiny_llama(tmp / "base", hidden=args.hidden, vocab=256)
        save_lora(base_dir, tmp / "lora", rank=args.rank, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
        url = f"s3://{s3_kit.new_bucket(endpoint)}/bench"
        results = {
            "local": measure(lambda _c: Registry(tmp / "local"), base_dir, tmp / "lora", args.versions),
            "s3": measure(lambda c: ObjectStoreRegistry(url, cache=tmp / "cache" / c), base_dir, tmp / "lora",
                          args.versions),
        }
    record = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": platform.processor()
              or platform.machine(), "cpus": os.cpu_count(), "load_average": os.getloadavg()[0], "args": vars(args)
              | {"out": str(args.out)}, "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "registry_backends.json").write_text(json.dumps(record, indent=2))
    rows = ["| operation | local (ms) | s3 via moto (ms) | s3 / local |", "|---|---:|---:|---:|"]
    for key, label in (("add_base_ms", "base add (once)"), ("import_ms", "import (median)"),
                       ("open_new_client_ms", "open, new client, empty cache (median)"),
                       ("load_first_ms", "first load after open (median)"), ("load_warm_ms", "load again (median)")):
        local, s3 = results["local"][key], results["s3"][key]
        rows.append(f"| {label} | {local:.1f} | {s3:.1f} | {s3 / local:.2f}x |")
    table = "\n".join(rows)
    (args.out / "registry_backends.md").write_text(
        f"Registry back ends, {record['date']}, adapter {results['local']['adapter_bytes'] / 1e6:.2f} MB, base "
        f"{results['local']['base_bytes'] / 1e6:.1f} MB "
        f"(hidden {args.hidden}, 2 layers, rank {args.rank} on q/k/v/o), load average {record['load_average']:.2f}"
        f"\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
