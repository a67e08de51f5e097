"""The shipped assets: the data sets come from the package's own copy only (never another source), with
the published row counts and split sizes; a missing or altered copy is a clear error; model packages are
found without importing them."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

from adapterhub_local import assets
from adapterhub_local.errors import IntegrityError, NotFoundError
from adapterhub_local.train.data import read_rows, split_rows


@pytest.mark.parametrize("name", sorted(assets.DATA_FILES))
def test_each_data_asset_is_the_packaged_copy_with_its_published_rows(name: str) -> None:
    path = assets.resolve(f"asset:{name}")
    assert path.is_relative_to(assets.DATA_DIR)
    assert len(read_rows(f"asset:{name}")) == assets.DATA_FILES[name].rows


def test_the_readme_sentiment_split_reproduces() -> None:
    # The README's figures: 8,213 training snippets and 1,062 test reviews from held-out movies
    # (recipes/sentiment-minilm-*.yaml: split by movie, 0.1 / 0.1, seed 0).
    train, validation, test = split_rows(read_rows("asset:rotten_tomatoes"), "movie", 0.1, 0.1, 0)
    assert (len(train), len(test)) == (8213, 1062)
    assert len(train) + len(validation) + len(test) == 10_327
    assert not {r["movie"] for r in train} & {r["movie"] for r in test}


def test_the_data_never_comes_from_outside_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A working directory with a ../shared/data beside it, and the old environment variable, change nothing.
    (tmp_path / "shared" / "data" / "rotten_tomatoes").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "rotten_tomatoes" / "reviews.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "clone").mkdir()
    monkeypatch.chdir(tmp_path / "clone")
    monkeypatch.setenv("ADAPTERHUB_DATA", str(tmp_path / "shared" / "data"))
    assert assets.rotten_tomatoes().is_relative_to(assets.DATA_DIR)
    assert "shared" not in Path(assets.__file__).read_text(encoding="utf-8")


def test_a_missing_copy_is_an_error_not_a_fallback(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match=r"e2e data file .* is missing.*git checkout"):
        assets.data_file("e2e", root=tmp_path)


def test_an_altered_copy_is_refused(tmp_path: Path) -> None:
    target = tmp_path / assets.DATA_FILES["rotten_tomatoes"].relative
    target.parent.mkdir(parents=True)
    shutil.copy(assets.DATA_DIR / assets.DATA_FILES["rotten_tomatoes"].relative, target)
    content = gzip.decompress(target.read_bytes())
    target.write_bytes(gzip.compress(content[: len(content) // 2]))  # rows dropped: another split
    with pytest.raises(IntegrityError, match="does not hold the published rotten_tomatoes data"):
        assets.data_file("rotten_tomatoes", root=tmp_path)
    target.write_bytes(b"not gzip")
    with pytest.raises(IntegrityError, match="not a readable gzip file"):
        assets.data_file("rotten_tomatoes", root=tmp_path)


def test_unknown_asset_is_clear_and_paths_pass_through() -> None:
    with pytest.raises(NotFoundError, match="unknown asset 'nope'"):
        assets.resolve("asset:nope")
    assert assets.resolve("some/file.jsonl") == Path("some/file.jsonl")


def test_model_packages_are_found_without_importing_them() -> None:
    try:
        minilm = assets.minilm_dir()
        gguf = assets.smollm2_gguf()
    except NotFoundError as exc:
        pytest.skip(f"asset packages not installed: {exc}")
    assert (minilm / "config.json").exists() and gguf.suffix == ".gguf"
