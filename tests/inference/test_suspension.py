"""The fast-path switch: off while any block is open — nested, from another thread, left by an exception."""

from __future__ import annotations

import threading

import pytest

from adapterhub_local.inference.suspension import Suspension


def test_blocks_nest_and_the_path_is_back_only_after_the_last() -> None:
    switch = Suspension()
    assert not switch.active
    with switch.block():
        with switch.block():
            assert switch.active
        assert switch.active
    assert not switch.active


def test_a_block_in_one_thread_is_seen_by_every_thread() -> None:
    switch = Suspension()
    opened, release = threading.Event(), threading.Event()

    def hold() -> None:
        with switch.block():
            opened.set()
            release.wait(5)

    worker = threading.Thread(target=hold)
    worker.start()
    assert opened.wait(5) and switch.active
    release.set()
    worker.join(5)
    assert not switch.active


def test_an_exception_closes_the_block() -> None:
    switch = Suspension()
    with pytest.raises(RuntimeError), switch.block():
        raise RuntimeError("boom")
    assert not switch.active
