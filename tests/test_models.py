"""models: loading a registered base in the dtype a precision asks for."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapterhub_local import runtime
from adapterhub_local.models import load_base_model
from adapterhub_local.registry import Registry
from tests.conftest import make_tiny_llama


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    reg = Registry(tmp_path / "registry")
    reg.add_base("tl", str(make_tiny_llama(tmp_path / "tl")))
    return reg


@pytest.mark.parametrize(("precision", "native", "dtype"), [
    ("auto", True, torch.bfloat16), ("auto", False, torch.float32), ("bf16", False, torch.bfloat16),
    ("fp32", True, torch.float32),
])
def test_a_precision_name_loads_the_base_in_its_dtype(registry: Registry, monkeypatch: pytest.MonkeyPatch,
                                                       precision: str, native: bool, dtype: torch.dtype) -> None:
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda flags=None: native)
    model = load_base_model(registry.base("tl"), dtype=precision)
    assert {p.dtype for p in model.parameters()} == {dtype}
    fp32 = load_base_model(registry.base("tl"), dtype=torch.float32)
    for (name, a), (_, b) in zip(model.named_parameters(), fp32.named_parameters(), strict=True):
        assert torch.equal(a, b.to(dtype)), name  # the same weights, rounded once


def test_an_unknown_precision_is_refused(registry: Registry) -> None:
    from adapterhub_local.errors import ConfigError

    with pytest.raises(ConfigError, match="fp4"):
        load_base_model(registry.base("tl"), dtype="fp4")
