"""The import gate (issue 10 item 7): the attack catalogue, one parametrized test per class, several
inputs each. Every refusal names the problem, publishes nothing, and ``verify`` reports the same class
of problem on a stored version whose files (and card hashes) were rewritten to hold it."""

from __future__ import annotations

import json
import os
import signal
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from adapterhub_local.errors import AdapterHubError, FormatError, ShapeMismatchError, UnsupportedError
from adapterhub_local.registry import Registry
from adapterhub_local.registry.maintenance import verify
from tests.conftest import make_tiny_llama
from tests.registry import s3_kit
from tests.registry.attack_kit import (
    DROP,
    PREFIX,
    adapter_dir,
    assert_nothing_published,
    lora_config,
    lora_tensors,
    raw_safetensors,
    write_tensors,
)


@pytest.fixture(scope="module", params=["local", "s3"])
def reg(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """The admission gate on both back ends: a local directory and an S3-compatible object store."""
    root = tmp_path_factory.mktemp("admission")
    with pytest.MonkeyPatch.context() as env:
        if request.param == "local":
            registry = Registry(root / "registry")
        else:
            from adapterhub_local.registry.objectstore import ObjectStoreRegistry

            endpoint = request.getfixturevalue("endpoint")
            for key, value in s3_kit.environment(endpoint).items():
                env.setenv(key, value)
            registry = ObjectStoreRegistry(f"s3://{s3_kit.new_bucket(endpoint)}/registry", cache=root / "cache")
        registry.add_base("tiny", str(make_tiny_llama(root / "tiny")))
        yield registry


@pytest.fixture
def no_hang() -> Iterator[None]:
    """Turn a blocked read (a FIFO opened by mistake) into a failure within seconds."""
    def _alarm(signum: int, frame: Any) -> None:
        raise TimeoutError("the import blocked")

    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _refused(reg: Registry, source: Path, error: type[AdapterHubError], needle: str) -> None:
    name = f"x{abs(hash(str(source))) % 10**8}"
    with pytest.raises(error, match=needle):
        reg.register_adapter(name, source, "tiny")
    assert_nothing_published(reg, name)


def test_a_valid_hand_made_adapter_is_admitted(reg: Registry, tmp_path: Path) -> None:
    card = reg.register_adapter("ok", adapter_dir(tmp_path / "a"), "tiny")
    assert (card.rank, card.alpha, card.kind) == (4, 8.0, "lora")
    assert verify(reg, card.ref).ok


# ----------------------------------------------------------------- safetensors structure
def _valid_header() -> tuple[dict[str, Any], bytes]:
    header: dict[str, Any] = {}
    data = b""
    for name, (dtype, shape, raw) in lora_tensors().items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    return header, data


def _first(header: dict[str, Any]) -> dict[str, Any]:
    return header[f"{PREFIX}.q_proj.lora_A.weight"]


def _second(header: dict[str, Any]) -> dict[str, Any]:
    return header[f"{PREFIX}.q_proj.lora_B.weight"]


STRUCTURE: dict[str, tuple[Callable[[dict[str, Any], bytes], tuple[dict[str, Any], bytes, bytes | None]], str]] = {
    "trailing bytes": (lambda h, d: (h, d + b"\0" * 8, None), "trailing bytes"),
    "offsets past the end": (lambda h, d: (h, d[:-4], None), "past the end"),
    "overlapping offsets": (lambda h, d: (
        {**h, f"{PREFIX}.q_proj.lora_B.weight": {**_second(h), "data_offsets": [0, _second(h)["data_offsets"][1]
                                                                                - _second(h)["data_offsets"][0]]}},
        d, None), "overlaps|offsets"),
    "gap between tensors": (lambda h, d: (
        {k: {**v, "data_offsets": [v["data_offsets"][0] + 4, v["data_offsets"][1] + 4]} for k, v in h.items()},
        b"\0" * 4 + d, None), "gap"),
    "shape × dtype ≠ span": (lambda h, d: (
        {**h, f"{PREFIX}.q_proj.lora_A.weight": {**_first(h), "shape": [4, 16]}}, d, None), "offsets span"),
    "shape is a string": (lambda h, d: (
        {**h, f"{PREFIX}.q_proj.lora_A.weight": {**_first(h), "shape": "4,32"}}, d, None), "shape"),
    "negative dimension": (lambda h, d: (
        {**h, f"{PREFIX}.q_proj.lora_A.weight": {**_first(h), "shape": [-4, -32]}}, d, None), "shape"),
    "boolean dimension": (lambda h, d: (
        {**h, f"{PREFIX}.q_proj.lora_A.weight": {**_first(h), "shape": [True, 128]}}, d, None), "shape"),
    "float offsets": (lambda h, d: (
        {**h, f"{PREFIX}.q_proj.lora_A.weight": {**_first(h), "data_offsets": [0.0, 512.0]}}, d, None),
        "data_offsets"),
    "unknown dtype": (lambda h, d: (
        {**h, f"{PREFIX}.q_proj.lora_A.weight": {**_first(h), "dtype": "F31"}}, d, None), "unknown dtype"),
    "extra entry key": (lambda h, d: (
        {**h, f"{PREFIX}.q_proj.lora_A.weight": {**_first(h), "x": 1}}, d, None), "exactly"),
    "metadata not str→str": (lambda h, d: ({**h, "__metadata__": {"format": 1}}, d, None), "__metadata__"),
    "duplicate tensor name": (lambda h, d: (h, d, json.dumps(h)[:-1].encode() + b', "' + next(iter(h)).encode()
                                            + b'": ' + json.dumps(_first(h)).encode() + b"}"), "duplicate"),
    "header not an object": (lambda h, d: (h, d, b"[1, 2, 3]"), "not a JSON object"),
    "header not JSON": (lambda h, d: (h, d, b"{not json}"), "not valid JSON"),
    "NaN constant in header": (lambda h, d: (h, d, json.dumps(h).replace('"shape": [4, 32]', '"shape": [NaN, 32]',
                                                                          1).encode()), "non-standard|not valid"),
}


@pytest.mark.parametrize("attack", sorted(STRUCTURE))
def test_malformed_safetensors_is_refused(reg: Registry, tmp_path: Path, attack: str) -> None:
    mutate, needle = STRUCTURE[attack]
    header, data = _valid_header()
    new_header, new_data, raw = mutate(header, data)
    directory = adapter_dir(tmp_path / "a")
    raw_safetensors(directory / "adapter_model.safetensors", new_header, new_data, raw)
    _refused(reg, directory, FormatError, needle)


@pytest.mark.parametrize("length", [0, 1, 2**63, 10**9])
def test_impossible_header_length_is_refused(reg: Registry, tmp_path: Path, length: int) -> None:
    directory = adapter_dir(tmp_path / "a")
    weights = directory / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[0:8] = length.to_bytes(8, "little")
    weights.write_bytes(bytes(data))
    _refused(reg, directory, FormatError, "header length")


# ----------------------------------------------------------------------- tensor values
def _poison(dtype: str, pattern: bytes) -> dict[str, tuple[str, list[int], bytes]]:
    tensors = lora_tensors(dtype=dtype)
    name = f"{PREFIX}.v_proj.lora_B.weight"
    kind, shape, raw = tensors[name]
    tensors[name] = (kind, shape, pattern + raw[len(pattern):])
    return tensors


VALUES = {
    "F32 NaN": (_poison("F32", bytes.fromhex("0000c07f")), "non-finite"),
    "F32 +inf": (_poison("F32", bytes.fromhex("0000807f")), "non-finite"),
    "F32 -inf": (_poison("F32", bytes.fromhex("000080ff")), "non-finite"),
    "F16 NaN": (_poison("F16", bytes.fromhex("007e")), "non-finite"),
    "F16 inf": (_poison("F16", bytes.fromhex("007c")), "non-finite"),
    "BF16 NaN": (_poison("BF16", bytes.fromhex("c07f")), "non-finite"),
    "BF16 -inf": (_poison("BF16", bytes.fromhex("80ff")), "non-finite"),
    "F64 NaN": (_poison("F64", bytes.fromhex("000000000000f87f")), "non-finite"),
    "integer tensors": ({k: ("I32", s, r) for k, (_, s, r) in lora_tensors().items()}, "dtype I32"),
    "bool tensors": ({k: ("BOOL", s, b"\1" * (len(r) // 4)) for k, (_, s, r) in lora_tensors().items()},
                     "dtype BOOL"),
}


@pytest.mark.parametrize("attack", sorted(VALUES))
def test_non_finite_or_non_float_tensors_are_refused(reg: Registry, tmp_path: Path, attack: str) -> None:
    tensors, needle = VALUES[attack]
    _refused(reg, adapter_dir(tmp_path / "a", tensors=tensors), FormatError, needle)


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F64"])
def test_finite_float_dtypes_are_admitted(reg: Registry, tmp_path: Path, dtype: str) -> None:
    card = reg.register_adapter(f"ok-{dtype.lower()}", adapter_dir(tmp_path / "a", tensors=lora_tensors(dtype=dtype)),
                                "tiny")
    assert verify(reg, card.ref).ok


# ---------------------------------------------------------------------- config types
CONFIG_TYPES = {
    "r as string": (lora_config(r="4"), "r must be an integer"),
    "r as float": (lora_config(r=4.0), "r must be an integer"),
    "r as bool": (lora_config(r=True), "r must be an integer"),
    "r zero": (lora_config(r=0), "r must be an integer >= 1"),
    "r negative": (lora_config(r=-4), "r must be an integer >= 1"),
    "r missing": (lora_config(r=DROP), "r must be an integer"),
    "alpha NaN": (lora_config(lora_alpha=float("nan")), "lora_alpha must be a finite number"),
    "alpha inf": (lora_config(lora_alpha=float("inf")), "lora_alpha must be a finite number"),
    "alpha zero": (lora_config(lora_alpha=0), "lora_alpha must be a finite number > 0"),
    "alpha negative": (lora_config(lora_alpha=-8), "lora_alpha must be a finite number > 0"),
    "alpha as string": (lora_config(lora_alpha="8"), "lora_alpha must be"),
    "target_modules as int": (lora_config(target_modules=3), "target_modules must be"),
    "fan_in_fan_out as string": (lora_config(fan_in_fan_out="no"), "fan_in_fan_out must be true or false"),
    "rank_pattern bad value": (lora_config(rank_pattern={"q_proj": "4"}), "rank_pattern must map"),
    "alpha_pattern NaN": (lora_config(alpha_pattern={"q_proj": float("nan")}), "alpha_pattern must map"),
    "task_type as list": (lora_config(task_type=["CAUSAL_LM"]), "task_type must be a string"),
}


@pytest.mark.parametrize("attack", sorted(CONFIG_TYPES))
def test_config_with_wrong_types_is_refused(reg: Registry, tmp_path: Path, attack: str) -> None:
    config, needle = CONFIG_TYPES[attack]
    _refused(reg, adapter_dir(tmp_path / "a", config=config), FormatError, needle)


@pytest.mark.parametrize("text", ["[1, 2]", '"LORA"', "{", '{"peft_type": "LORA", "r": 4, "r": 8}'])
def test_config_that_is_not_one_json_object_is_refused(reg: Registry, tmp_path: Path, text: str) -> None:
    directory = adapter_dir(tmp_path / "a")
    (directory / "adapter_config.json").write_text(text)
    _refused(reg, directory, FormatError, "adapter config")


# ------------------------------------------------------------------- rank consistency
RANKS = {
    "config r 8, tensors rank 4": (lora_config(r=8), lora_tensors(rank=4), "rank 4 but the config says r=8"),
    "config r 2, tensors rank 4": (lora_config(r=2), lora_tensors(rank=4), "rank 4 but the config says r=2"),
    "rank_pattern disagrees": (lora_config(rank_pattern={"v_proj": 8}), lora_tensors(rank=4),
                               "rank 4 but the config says r=8"),
    "A and B ranks differ": (lora_config(), {**lora_tensors(rank=4), f"{PREFIX}.q_proj.lora_B.weight":
                                             lora_tensors(rank=2)[f"{PREFIX}.q_proj.lora_B.weight"]},
                             "mismatched LoRA tensors"),
    "B missing": (lora_config(), {k: v for k, v in lora_tensors().items() if not k.endswith("q_proj.lora_B.weight")},
                  "mismatched LoRA tensors"),
}


@pytest.mark.parametrize("attack", sorted(RANKS))
def test_rank_must_match_the_tensors(reg: Registry, tmp_path: Path, attack: str) -> None:
    config, tensors, needle = RANKS[attack]
    _refused(reg, adapter_dir(tmp_path / "a", config=config, tensors=tensors), FormatError, needle)


# -------------------------------------------------------------- unsupported features
def _with_tensor(name: str, shape: list[int]) -> dict[str, tuple[str, list[int], bytes]]:
    count = 1
    for dim in shape:
        count *= dim
    return {**lora_tensors(), name: ("F32", shape, b"\0" * 4 * count)}


EMBED = "base_model.model.model.embed_tokens"
GOOD_MAGNITUDES_ = {"q_proj": [1.0] * 32, "v_proj": [0.5] * 16}


def _magnitudes(values: dict[str, list[float]]) -> dict[str, tuple[str, list[int], bytes]]:
    import numpy as np

    return {f"{PREFIX}.{m}.lora_magnitude_vector": ("F32", [len(v)], np.asarray(v, "<f4").tobytes())
            for m, v in values.items()}


def _embedding_lora(rank: int = 4, vocab: int = 96, hidden: int = 32) -> dict[str, tuple[str, list[int], bytes]]:
    a = _with_tensor(f"{EMBED}.lora_embedding_A", [rank, vocab])
    return {**a, **{k: v for k, v in _with_tensor(f"{EMBED}.lora_embedding_B", [hidden, rank]).items() if k not in a}}


def _tokens(count: int, hidden: int = 32) -> dict[str, tuple[str, list[int], bytes]]:
    return _with_tensor(f"{EMBED}.token_adapter.trainable_tokens_delta", [count, hidden])


UNSUPPORTED = {
    "bias all": (lora_config(bias="all"), None, "bias='none'"),
    "bias lora_only": (lora_config(bias="lora_only"), None, "bias='none'"),
    "lora_bias": (lora_config(lora_bias=True), None, "lora_bias"),
    "IA3": ({"peft_type": "IA3", "target_modules": ["q_proj"]}, None, "peft_type 'IA3' is not supported"),
    "LOHA": ({"peft_type": "LOHA", "r": 4}, None, "peft_type 'LOHA' is not supported"),
    "peft_type missing": (lora_config(peft_type=DROP), None, "peft_type None is not supported"),
    "peft_type not a string": (lora_config(peft_type=1), None, "is not supported"),
    "layer replication": (lora_config(layer_replication=[[0, 2], [1, 2]]), None, "layer_replication"),
    "DoRA on an embedding": (lora_config(use_dora=True, target_modules=["q_proj", "v_proj", "embed_tokens"]),
                             {**_magnitudes(GOOD_MAGNITUDES_), **_embedding_lora()}, "DoRA on the embedding"),
    "embedding LoRA and trainable tokens on one embedding": (
        lora_config(target_modules=["q_proj", "v_proj", "embed_tokens"], trainable_token_indices=[1, 2]),
        {**_embedding_lora(), **_tokens(2)}, "both an embedding LoRA and trainable tokens"),
    "prompt for encoder-decoder": ({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2,
                                    "num_transformer_submodules": 2},
                                   {"prompt_embeddings": ("F32", [4, 32], b"\0" * 512)}, "encoder-decoder"),
}


@pytest.mark.parametrize("attack", sorted(UNSUPPORTED))
def test_features_the_engine_cannot_serve_are_refused_at_import(reg: Registry, tmp_path: Path, attack: str) -> None:
    config, tensors, needle = UNSUPPORTED[attack]
    _refused(reg, adapter_dir(tmp_path / "a", config=config, tensors=tensors), UnsupportedError, needle)


EMBEDDING_KINDS = {
    "embedding LoRA": (lora_config(target_modules=["q_proj", "v_proj", "embed_tokens"]), _embedding_lora()),
    "trainable tokens": (lora_config(trainable_token_indices=[1, 2, 95]), _tokens(3)),
    "lm_head copy": (lora_config(modules_to_save=["lm_head"]),
                     _with_tensor("base_model.model.lm_head.weight", [96, 32])),
}


@pytest.mark.parametrize("kind", sorted(EMBEDDING_KINDS))
def test_embedding_and_module_kinds_are_admitted(reg: Registry, tmp_path: Path, kind: str) -> None:
    config, tensors = EMBEDDING_KINDS[kind]
    card = reg.register_adapter(f"kind-{kind.replace(' ', '-').replace('_', '-')}", adapter_dir(
        tmp_path / "a", config=config, tensors=tensors), "tiny")
    assert card.kind == "lora" and verify(reg, card.ref).ok


EMBEDDING_REFUSALS = {
    "embedding LoRA with only A": (lora_config(target_modules=["q_proj", "v_proj", "embed_tokens"]),
                                   _with_tensor(f"{EMBED}.lora_embedding_A", [4, 96]), FormatError, "mismatched"),
    "embedding LoRA for another vocabulary": (lora_config(target_modules=["q_proj", "v_proj", "embed_tokens"]),
                                              _embedding_lora(vocab=100), ShapeMismatchError, "100×32 embedding"),
    "token id outside the vocabulary": (lora_config(trainable_token_indices=[1, 96]), _tokens(2), ShapeMismatchError,
                                        "outside the base's vocabulary"),
    "tokens on the LM head": (lora_config(trainable_token_indices={"lm_head": [1, 2]}),
                              _with_tensor("base_model.model.lm_head.token_adapter.trainable_tokens_delta", [2, 32]),
                              UnsupportedError, "output layer"),
    "token rows without ids": (lora_config(), _tokens(2), FormatError, "does not name it"),
    "ids without token rows": (lora_config(trainable_token_indices=[1, 2]), None, FormatError,
                               "no trainable_tokens_delta"),
    "one row too many": (lora_config(trainable_token_indices=[1, 2]), _tokens(3), FormatError, "one row per listed id"),
    "an id twice": (lora_config(trainable_token_indices=[1, 1]), _tokens(2), FormatError, "lists an id twice"),
    "copy of a module the base lacks": (lora_config(modules_to_save=["decoder_head"]),
                                        _with_tensor("base_model.model.decoder_head.weight", [96, 32]),
                                        ShapeMismatchError, "no counterpart in the base"),
    "copy of an undeclared module": (lora_config(), _with_tensor("base_model.model.lm_head.weight", [96, 32]),
                                     FormatError, "listed in modules_to_save"),
}


@pytest.mark.parametrize("attack", sorted(EMBEDDING_REFUSALS))
def test_embedding_and_module_kinds_are_checked_at_import(reg: Registry, tmp_path: Path, attack: str) -> None:
    config, tensors, error, needle = EMBEDDING_REFUSALS[attack]
    _refused(reg, adapter_dir(tmp_path / "a", config=config, tensors=tensors), error, needle)


# ------------------------------------------------------------------------------ DoRA
GOOD_MAGNITUDES = GOOD_MAGNITUDES_


def test_a_dora_adapter_with_positive_magnitudes_is_admitted(reg: Registry, tmp_path: Path) -> None:
    source = adapter_dir(tmp_path / "a", config=lora_config(use_dora=True),
                         tensors=lora_tensors() | _magnitudes(GOOD_MAGNITUDES))
    card = reg.register_adapter("dora-ok", source, "tiny")
    assert card.kind == "lora" and verify(reg, card.ref).ok


DORA = {
    "use_dora without magnitudes": (lora_config(use_dora=True), None, "lacks its DoRA magnitude"),
    "one magnitude missing": (lora_config(use_dora=True), lora_tensors() | _magnitudes({"q_proj": [1.0] * 32}),
                              "'model.layers.0.self_attn.v_proj' lacks its DoRA magnitude"),
    "magnitudes without use_dora": (lora_config(), lora_tensors() | _magnitudes(GOOD_MAGNITUDES),
                                    "use_dora is not true"),
    "magnitude of the wrong length": (lora_config(use_dora=True),
                                      lora_tensors() | _magnitudes({**GOOD_MAGNITUDES, "v_proj": [1.0] * 32}),
                                      "DoRA magnitude \\[32\\] is not \\[16\\]"),
    "magnitude without a LoRA pair": (lora_config(use_dora=True),
                                      lora_tensors() | _magnitudes({**GOOD_MAGNITUDES, "k_proj": [1.0] * 16}),
                                      "which has no LoRA pair"),
    "zero magnitude": (lora_config(use_dora=True),
                       lora_tensors() | _magnitudes({**GOOD_MAGNITUDES, "v_proj": [0.5] * 15 + [0.0]}), "<= 0"),
    "negative magnitude": (lora_config(use_dora=True),
                           lora_tensors() | _magnitudes({**GOOD_MAGNITUDES, "q_proj": [-1.0] * 32}), "<= 0"),
}


@pytest.mark.parametrize("attack", sorted(DORA))
def test_dora_magnitudes_are_checked(reg: Registry, tmp_path: Path, attack: str) -> None:
    config, tensors, needle = DORA[attack]
    _refused(reg, adapter_dir(tmp_path / "a", config=config, tensors=tensors), FormatError, needle)


# ------------------------------------------------------------------- fit to the base
FIT = {
    "module not on the base": (lora_config(target_modules=["q_proj", "v_proj", "x_proj"]),
                               {**lora_tensors(), **{k.replace("q_proj", "x_proj"): v for k, v in
                                                     lora_tensors(modules=("q_proj",)).items()}},
                               "does not exist in the base"),
    "wrong shape": (lora_config(), lora_tensors() | {f"{PREFIX}.v_proj.lora_B.weight": ("F32", [32, 4], b"\0" * 512)},
                    "adapter wants a 32×32 weight, base has \\[16, 32\\]"),
    "target not on the base": (lora_config(target_modules=["q_proj", "v_proj", "k_projx"]), None,
                               "target module 'k_projx' does not exist"),
    "layer beyond the base": (lora_config(), {k.replace("layers.0", "layers.7"): v for k, v in lora_tensors().items()},
                              "does not exist in the base"),
}


@pytest.mark.parametrize("attack", sorted(FIT))
def test_modules_and_targets_must_fit_the_base(reg: Registry, tmp_path: Path, attack: str) -> None:
    config, tensors, needle = FIT[attack]
    _refused(reg, adapter_dir(tmp_path / "a", config=config, tensors=tensors), ShapeMismatchError, needle)


def test_lora_tensors_outside_target_modules_are_refused(reg: Registry, tmp_path: Path) -> None:
    directory = adapter_dir(tmp_path / "a", config=lora_config(target_modules=["q_proj"]))
    _refused(reg, directory, FormatError, "not in target_modules")


# ------------------------------------------------------------------------ file kinds
def _symlink_out(directory: Path, fname: str, outside: Path) -> None:
    outside.write_bytes((directory / fname).read_bytes())
    (directory / fname).unlink()
    os.symlink(outside, directory / fname)


def _fifo(directory: Path, fname: str, outside: Path) -> None:
    (directory / fname).unlink()
    os.mkfifo(directory / fname)


def _device(directory: Path, fname: str, outside: Path) -> None:
    (directory / fname).unlink()
    if os.geteuid() == 0:
        os.mknod(directory / fname, stat.S_IFCHR | 0o644, os.makedev(1, 5))  # /dev/zero
    else:
        os.symlink("/dev/zero", directory / fname)


def _dir_in_place(directory: Path, fname: str, outside: Path) -> None:
    (directory / fname).unlink()
    (directory / fname).mkdir()


FILE_KINDS = {"symlink leaving the directory": (_symlink_out, "symlink leading outside"),
              "FIFO": (_fifo, "is a FIFO"), "device file": (_device, "device file|symlink leading outside"),
              "directory": (_dir_in_place, "is a directory")}


@pytest.mark.parametrize("fname", ["adapter_model.safetensors", "adapter_config.json", "card.json"])
@pytest.mark.parametrize("attack", sorted(FILE_KINDS))
def test_special_files_are_refused_without_reading_them(
    reg: Registry, tmp_path: Path, no_hang: None, attack: str, fname: str
) -> None:
    directory = adapter_dir(tmp_path / "a")
    if fname == "card.json":
        (directory / fname).write_text("{}")
    make, needle = FILE_KINDS[attack]
    make(directory, fname, tmp_path / "outside-secret")
    _refused(reg, directory, FormatError, needle)


def test_symlink_inside_the_directory_is_followed(reg: Registry, tmp_path: Path) -> None:
    directory = adapter_dir(tmp_path / "a")
    (directory / "adapter_config.json").rename(directory / "real.json")
    os.symlink("real.json", directory / "adapter_config.json")
    assert reg.register_adapter("linked", directory, "tiny").version == 1


# -------------------------------------------------------- verify reports the same classes
def _tamper(reg: Registry, ref: str, fname: str, content: bytes, update_card: bool) -> None:
    """Rewrite a stored file (and, if asked, the card's hash for it, as a careful attacker would)."""
    import hashlib

    directory = reg.path_of(reg.resolve(ref))
    os.chmod(directory, 0o755)
    target = directory / fname
    os.chmod(target, 0o644)
    target.write_bytes(content)
    if update_card:
        card_path = directory / "card.json"
        os.chmod(card_path, 0o644)
        card = json.loads(card_path.read_text())
        card["files"][fname] = hashlib.sha256(content).hexdigest()
        card_path.write_text(json.dumps(card))


STORED = {
    "DoRA config": ("adapter_config.json", json.dumps(lora_config(use_dora=True)).encode(),
                    "lacks its DoRA magnitude"),
    "rank mismatch": ("adapter_config.json", json.dumps(lora_config(r=8)).encode(), "config says r=8"),
    "alpha NaN": ("adapter_config.json", json.dumps(lora_config(lora_alpha=float("nan"))).encode(), "lora_alpha"),
    "alpha changed": ("adapter_config.json", json.dumps(lora_config(lora_alpha=16)).encode(), "alpha=8.0"),
    "NaN weights": ("adapter_model.safetensors", None, "non-finite"),
    "trailing bytes": ("adapter_model.safetensors", b"", "trailing bytes"),
}


@pytest.mark.parametrize("update_card", [False, True], ids=["hash-stale", "hash-rewritten"])
@pytest.mark.parametrize("attack", sorted(STORED))
def test_verify_reports_tampered_versions(reg: Registry, tmp_path: Path, attack: str, update_card: bool) -> None:
    fname, content, needle = STORED[attack]
    name = f"v-{abs(hash(attack)) % 10**6}-{int(update_card)}"
    card = reg.register_adapter(name, adapter_dir(tmp_path / "a"), "tiny")
    if content is None:
        write_tensors(tmp_path / "nan.safetensors", _poison("F32", bytes.fromhex("0000c07f")))
        content = (tmp_path / "nan.safetensors").read_bytes()
    elif content == b"":
        content = (reg.path_of(card) / fname).read_bytes() + b"\0" * 8
    _tamper(reg, card.ref, fname, content, update_card)
    problems = verify(reg, card.ref).problems
    expected = needle if update_card else f"{fname} does not match its sha256"
    assert any(expected in p for p in problems), problems
    assert not verify(reg).ok
