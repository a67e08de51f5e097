"""The registry on object storage, against a real S3-compatible server (moto's, see ``s3_kit``): the local
registry's contract tests run over both back ends, then what only a shared store has — two writer
processes, a writer killed mid-publish, damage in the store, a second client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from adapterhub_local.cli import main
from adapterhub_local.errors import IntegrityError, UnsupportedError
from adapterhub_local.registry import CardInfo, Registry
from adapterhub_local.registry.formats import load_tensors
from adapterhub_local.registry.objectstore import ObjectStoreRegistry
from tests.peft_factory import save_lora
from tests.registry import s3_kit

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def lora_dir(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    save_lora(tiny_llama_dir, tmp_path / "lora")
    return tmp_path / "lora"


Opener = Callable[[str], Registry]
"""A new client of the same registry; the argument names its own cache (a second machine)."""


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path, tiny_llama_dir: Path) -> tuple[Registry, Opener]:
    """The same registry contract on both back ends: (a registry holding base ``tiny``, an opener)."""
    if request.param == "local":
        registry = Registry(tmp_path / "registry")
        registry.add_base("tiny", str(tiny_llama_dir))
        return registry, lambda _cache: Registry.open(tmp_path / "registry")
    endpoint = request.getfixturevalue("s3_env")["AWS_ENDPOINT_URL"]
    url = f"s3://{s3_kit.new_bucket(endpoint)}/team/registry"
    registry = ObjectStoreRegistry(url, cache=tmp_path / "cache-a")
    registry.add_base("tiny", str(tiny_llama_dir))
    return registry, lambda cache: ObjectStoreRegistry(url, cache=tmp_path / cache, create=False)


# ----------------------------------------------------------------- the contract, on both back ends
def test_round_trip_is_exact_and_seen_by_a_second_client(backend: tuple[Registry, Opener], lora_dir: Path,
                                                        tmp_path: Path) -> None:
    registry, reopen = backend
    card = registry.register_adapter("qa", lora_dir, "tiny", CardInfo(task="qa"))
    other = reopen("cache-b")
    loaded = other.load_adapter("qa@1", base="tiny")
    source = load_tensors(lora_dir / "adapter_model.safetensors")
    assert loaded.card.content_hash == card.content_hash and loaded.card.task == "qa"
    assert set(loaded.tensors) == set(source) and all(torch.equal(loaded.tensors[k], source[k]) for k in source)
    weights = "adapter_model.safetensors"
    assert (loaded.path / weights).read_bytes() == (lora_dir / weights).read_bytes()
    assert other.base("tiny").fingerprint == registry.base("tiny").fingerprint


def test_numbers_increase_across_clients_and_references_resolve(backend: tuple[Registry, Opener],
                                                                lora_dir: Path, tiny_llama_dir: Path,
                                                                tmp_path: Path) -> None:
    registry, reopen = backend
    save_lora(tiny_llama_dir, tmp_path / "other", seed=7)
    first = registry.register_adapter("qa", lora_dir, "tiny", CardInfo(task="one"))
    second = reopen("cache-b").register_adapter("qa", lora_dir, "tiny", CardInfo(task="two"))
    third = reopen("cache-c").register_adapter("qa", tmp_path / "other", "tiny", CardInfo(task="three"))
    assert [first.version, second.version, third.version] == [1, 2, 3]
    fresh = reopen("cache-d")
    assert [r.ref for r in fresh.list_adapters()] == ["qa@1", "qa@2", "qa@3"]
    assert fresh.resolve("qa").task == "three" and fresh.resolve("qa@2").task == "two"
    assert fresh.resolve(f"sha256:{third.weights_sha256[:12]}").ref == "qa@3"


def test_index_is_rebuilt_from_what_is_stored(backend: tuple[Registry, Opener], lora_dir: Path) -> None:
    registry, reopen = backend
    for task in ("a", "b"):
        registry.register_adapter("qa", lora_dir, "tiny", CardInfo(task=task))
    fresh = reopen("cache-e")
    (fresh.root / "index.db").unlink(missing_ok=True)
    assert fresh.rebuild_index() == 2
    assert [r.ref for r in fresh.list_adapters()] == ["qa@1", "qa@2"]


def test_damaged_bytes_are_refused_on_read(backend: tuple[Registry, Opener], lora_dir: Path, tmp_path: Path,
                                           request: pytest.FixtureRequest) -> None:
    registry, reopen = backend
    card = registry.register_adapter("qa", lora_dir, "tiny")
    digest = card.files["adapter_model.safetensors"]
    if isinstance(registry, ObjectStoreRegistry):  # damage the store's object: a new client must refuse it
        fs = s3_kit.filesystem(request.getfixturevalue("s3_env")["AWS_ENDPOINT_URL"])
        key = f"{registry.prefix}/objects/{digest}"
        data = bytearray(fs.cat_file(key))
        data[-1] ^= 1
        fs.pipe_file(key, bytes(data))
    else:
        weights = registry.path_of(card) / "adapter_model.safetensors"
        weights.chmod(0o644)
        data = bytearray(weights.read_bytes())
        data[-1] ^= 1
        weights.write_bytes(bytes(data))
    reader = reopen("cache-f")
    if isinstance(reader, ObjectStoreRegistry):  # checked on download: never installed in the cache
        assert ("qa", 1) in reader.remote_problems and reader.versions_on_disk("qa") == []
    for ref in ("qa@1", "qa"):
        with pytest.raises(IntegrityError, match="sha256"):
            reader.load_adapter(ref)


# --------------------------------------------------------------- what only a shared store has
def _worker(env: dict[str, str], url: str, cache: Path, source: Path, count: int, tag: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tests.registry.objectstore_worker", url, str(cache), str(source),
                             str(count), tag], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})


@pytest.fixture
def shared(s3_env: dict[str, str], tmp_path: Path, tiny_llama_dir: Path) -> str:
    url = f"s3://{s3_kit.new_bucket(s3_env['AWS_ENDPOINT_URL'])}/reg"
    ObjectStoreRegistry(url, cache=tmp_path / "setup").add_base("tiny", str(tiny_llama_dir))
    return url


def test_two_writer_processes_never_share_or_lose_a_version(shared: str, s3_env: dict[str, str], lora_dir: Path,
                                                            tmp_path: Path) -> None:
    writers = [_worker(s3_env, shared, tmp_path / f"w{i}", lora_dir, 3, f"w{i}") for i in range(2)]
    outputs = [w.communicate(timeout=240) for w in writers]
    assert all(w.returncode == 0 for w in writers), [o[1][-2000:] for o in outputs]
    published = [json.loads(line) for out, _ in outputs for line in out.splitlines()]
    assert sorted(p["ref"] for p in published) == [f"qa@{n}" for n in range(1, 7)]
    reader = ObjectStoreRegistry(shared, cache=tmp_path / "reader", create=False)
    for p in published:  # each number holds exactly what the writer that claimed it published
        assert reader.resolve(p["ref"]).task == p["task"]
    assert not reader.remote_problems and all(not reader.check_files(reader.resolve(p["ref"])) for p in published)


def test_a_writer_killed_mid_publish_leaves_nothing_visible(shared: str, s3_env: dict[str, str], lora_dir: Path,
                                                             tmp_path: Path) -> None:
    first = _worker(s3_env, shared, tmp_path / "w0", lora_dir, 1, "kept")
    assert first.wait(timeout=120) == 0
    stalled = _worker(s3_env, shared, tmp_path / "w1", lora_dir, -1, "killed")
    assert stalled.stdout is not None
    line = stalled.stdout.readline()  # its objects are uploaded; its manifest is not written yet
    assert "uploaded" in line, stalled.communicate(timeout=30)[1][-2000:]
    stalled.send_signal(signal.SIGKILL)
    stalled.wait(timeout=30)
    fs = s3_kit.filesystem(s3_env["AWS_ENDPOINT_URL"])
    prefix = shared.split("://", 1)[1]
    assert all(fs.exists(f"{prefix}/objects/{d}") for d in json.loads(line)["uploaded"])
    reader = ObjectStoreRegistry(shared, cache=tmp_path / "reader", create=False)
    assert [r.ref for r in reader.list_adapters()] == ["qa@1"] and not reader.remote_problems
    assert reader.register_adapter("qa", lora_dir, "tiny").version == 2


# ------------------------------------------------------------------------------- the command line
def test_cli_on_an_s3_registry(s3_env: dict[str, str], tiny_llama_dir: Path, lora_dir: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    url = f"s3://{s3_kit.new_bucket(s3_env['AWS_ENDPOINT_URL'])}/cli"

    def run(*args: str) -> tuple[int, str, str]:
        code = main(["-R", url, *args])
        out, err = capsys.readouterr()
        return code, out, err

    assert run("list")[0] != 0  # a reading command never creates a registry
    code, _, err = run("-R", "s3://no-such-bucket-here/x", "base", "add", "tiny", str(tiny_llama_dir))
    assert code != 0 and "create the bucket first" in err
    assert run("base", "add", "tiny", str(tiny_llama_dir))[0] == 0
    assert run("import", str(lora_dir), "--name", "qa", "--base", "tiny")[0] == 0
    code, out, _ = run("list", "--json")
    assert code == 0 and [r["ref"] for r in json.loads(out)] == ["qa@1"]
    assert run("verify")[0] == 0
    assert run("export", "qa@1", str(tmp_path / "v"), "--target", "vllm")[0] == 0
    assert run("tag", "qa@1", "prod")[0] == 0
    code, out, _ = run("show", "qa:prod", "--json")
    assert code == 0 and json.loads(out)["version"] == 1
    assert run("delete", "qa@1", "--yes")[0] == 0
    code, _, err = run("base", "remove", "tiny")
    assert code != 0 and "not supported on an object-store registry" in err


def test_tags_move_for_every_client(backend: tuple[Registry, Opener], lora_dir: Path) -> None:
    registry, reopen = backend
    registry.register_adapter("qa", lora_dir, "tiny", CardInfo(task="one"))
    registry.register_adapter("qa", lora_dir, "tiny", CardInfo(task="two"))
    registry.tag("qa@1", "prod")
    other = reopen("cache-b")
    assert other.resolve("qa:prod").version == 1
    other.tag("qa@2", "prod")
    other.tag("qa@1", "old")
    other.untag("qa", "old")
    assert reopen("cache-c").tags("qa") == [("qa", "prod", 2)]
    registry.list_adapters()  # a client's listing syncs (a server's reload does this)
    assert registry.resolve("qa:prod").version == 2


def test_a_delete_is_seen_by_every_client_and_its_number_never_reused(backend: tuple[Registry, Opener],
                                                                     lora_dir: Path) -> None:
    registry, reopen = backend
    for task in ("one", "two"):
        registry.register_adapter("qa", lora_dir, "tiny", CardInfo(task=task))
    other = reopen("cache-b")
    assert other.delete("qa@2") == "qa@2"
    assert [r.ref for r in registry.list_adapters()] == ["qa@1"]  # the first client's listing syncs the delete
    assert [r.ref for r in reopen("cache-c").list_adapters()] == ["qa@1"]
    assert registry.register_adapter("qa", lora_dir, "tiny", CardInfo(task="three")).version == 3
    other.list_adapters()  # a sync point (open, list, a server's reload)
    assert other.resolve("qa").task == "three"
    if isinstance(registry, ObjectStoreRegistry):
        with pytest.raises(UnsupportedError, match="object-store"):
            registry.remove_base("tiny")


def test_concurrent_taggers_never_lose_an_update(shared: str, lora_dir: Path, tmp_path: Path) -> None:
    import threading

    ObjectStoreRegistry(shared, cache=tmp_path / "w").register_adapter("qa", lora_dir, "tiny")
    clients = [ObjectStoreRegistry(shared, cache=tmp_path / f"t{i}", create=False) for i in range(2)]
    errors: list[BaseException] = []

    def tag_all(client: ObjectStoreRegistry, who: str) -> None:
        try:
            for i in range(6):
                client.tag("qa@1", f"{who}{i}")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=tag_all, args=(c, w)) for c, w in zip(clients, "ab", strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    seq, tags = clients[0].remote_tags("qa")
    assert sorted(tags) == sorted(f"{w}{i}" for w in "ab" for i in range(6)) and seq == 12
