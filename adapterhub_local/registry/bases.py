"""Registering base models: a local Hugging Face directory, a GGUF file (dequantized once to
safetensors), or a hub id at a revision. Each base lives in ``bases/<name>/`` with its weights,
tokenizer and ``base.json`` (source, architecture, fingerprint).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from adapterhub_local.errors import FormatError, RemoteError
from adapterhub_local.pooling import sentence_transformers_files
from adapterhub_local.registry.fingerprint import fingerprint, weight_files
from adapterhub_local.registry.formats import read_json, refuse_pickle_dir

BASE_FILE = "base.json"
_HEX64 = re.compile(r"[0-9a-f]{64}", re.ASCII)


def _opt_str(value: Any) -> bool:
    return value is None or isinstance(value, str)


_BASE_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "name": (lambda v: isinstance(v, str), "a string"),
    "source": (lambda v: isinstance(v, str), "a string"),
    "source_kind": (lambda v: v in ("local", "gguf", "hub"), "local, gguf or hub"),
    "revision": (_opt_str, "a string or null"),
    "architecture": (lambda v: isinstance(v, str), "a string"),
    "model_type": (lambda v: isinstance(v, str), "a string"),
    "hidden_size": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v > 0),
                    "a positive integer or null"),
    "fingerprint": (lambda v: isinstance(v, str) and _HEX64.fullmatch(v) is not None, "64 hex digits"),
    "created": (lambda v: isinstance(v, str), "a string"),
}
# Files copied from a model directory besides *.safetensors (weights are listed separately).
_MODEL_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
    "added_tokens.json", "chat_template.jinja", "model.safetensors.index.json",
)


@dataclass
class BaseRecord:
    """A registered base model."""

    name: str
    source: str
    source_kind: str  # "local" | "gguf" | "hub"
    revision: str | None
    architecture: str
    model_type: str
    hidden_size: int | None
    fingerprint: str
    created: str
    path: Path

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("path")
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def load(cls, directory: Path) -> BaseRecord:
        """Read ``base.json`` as untrusted input: exact fields, right types, the name of its directory."""
        path = Path(directory) / BASE_FILE
        fix = f"restore {path} or remove the base directory and register the base again with `adapterhub base add`"
        data = read_json(path, "base record", fix)
        expected = {f.name for f in fields(cls)} - {"path"}
        if set(data) != expected:
            raise FormatError(f"{path} is malformed (fields {sorted(set(data) ^ expected)} missing or unknown)", fix)
        problems = [f"{key} must be {rule}" for key, (check, rule) in _BASE_CHECKS.items() if not check(data[key])]
        if data["name"] != Path(directory).name:
            problems.append(f"name {data['name']!r} is not the directory's name {Path(directory).name!r}")
        if problems:
            raise FormatError(f"{path} is malformed: {'; '.join(problems)}", fix)
        return cls(path=Path(directory), **data)

    @property
    def short(self) -> str:
        return self.fingerprint[:12]


def source_kind(source: str) -> str:
    """Classify a base source: an existing directory, a ``.gguf`` file, or a hub id."""
    path = Path(source)
    if path.is_dir():
        return "local"
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FormatError(f"GGUF file {source} does not exist", "check the path")
        return "gguf"
    if path.exists():
        raise FormatError(f"{source} is neither a model directory nor a .gguf file", "give one of those or a hub id")
    if source.count("/") == 1 and not source.startswith((".", "/")):
        return "hub"
    raise FormatError(
        f"base source {source!r} was not found",
        "give an existing model directory, a .gguf file, or a hub id like org/model",
    )


def materialize(source: str, kind: str, revision: str | None, target: Path) -> None:
    """Fill the empty directory ``target`` with config, tokenizer and safetensors weights."""
    if kind == "local":
        _copy_model_dir(Path(source), target)
    elif kind == "gguf":
        _convert_gguf(Path(source), target)
    else:
        _download_hub(source, revision, target)


def _copy_model_dir(source: Path, target: Path) -> None:
    if not (source / "config.json").exists():
        raise FormatError(f"{source} has no config.json", "give a Hugging Face model directory")
    if not list(source.glob("*.safetensors")):
        refuse_pickle_dir(source)
        raise FormatError(f"{source} holds no *.safetensors weights", "save the model with safe_serialization")
    for item in source.iterdir():
        if item.is_file() and (item.suffix == ".safetensors" or item.name in _MODEL_FILES):
            shutil.copy2(item, target / item.name)
    # The base's declared pooling (sentence-transformers modules.json + Pooling config) decides `auto` pooling.
    for rel in sentence_transformers_files(source):
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / rel, target / rel)


def _convert_gguf(source: Path, target: Path) -> None:
    """Dequantize a GGUF checkpoint through transformers and save it as safetensors (fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name)
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    except Exception as exc:  # transformers raises many types for unsupported GGUF content
        raise FormatError(f"cannot convert GGUF {source}: {exc}", "install the `gguf` package or use a HF dir") from exc
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights are
    # already dequantized fp32 tensors, so drop the marker.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(target), safe_serialization=True)
    tokenizer.save_pretrained(str(target))


def _download_hub(repo_id: str, revision: str | None, target: Path) -> None:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(
            repo_id, revision=revision, local_dir=str(target),
            allow_patterns=["*.safetensors", *_MODEL_FILES],
        )
    except Exception as exc:  # network, auth, missing repo
        raise RemoteError(f"cannot download {repo_id}@{revision or 'main'}: {exc}",
                          "check the hub id, revision and network, or register a local directory") from exc
    cache = target / ".cache"
    if cache.exists():
        shutil.rmtree(cache)


def describe(directory: Path, name: str, source: str, kind: str, revision: str | None) -> BaseRecord:
    """Build the record for a materialized base directory (computes the fingerprint)."""
    weight_files(directory)
    config: dict[str, Any] = read_json(directory / "config.json", "model config")
    archs = config.get("architectures") or [config.get("model_type", "unknown")]
    hidden = config.get("hidden_size") or config.get("n_embd") or config.get("d_model")
    return BaseRecord(
        name=name, source=source if kind == "hub" else str(Path(source).resolve()), source_kind=kind,
        revision=revision, architecture=str(archs[0]), model_type=str(config.get("model_type", "unknown")),
        hidden_size=int(hidden) if hidden else None, fingerprint=fingerprint(directory),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), path=directory,
    )
