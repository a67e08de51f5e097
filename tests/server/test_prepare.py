"""Request preparation: names resolve to versions made for this base and stay put until a reload;
prompts tokenize as the engine runs them; the context budget refuses what cannot fit."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapterhub_local.errors import FingerprintMismatchError, UnsupportedError
from adapterhub_local.inference.engine import Engine
from adapterhub_local.inference.types import Request
from adapterhub_local.registry import CardInfo, Registry
from adapterhub_local.server.errors import PromptTooLongError, UnknownModelError
from adapterhub_local.server.prepare import ModelResolver, PromptBuilder, Target
from adapterhub_local.server.schemas import ChatMessage
from tests.peft_factory import save_lora
from tests.server.assets import build_registry, char_tokenizer


def test_resolution_is_pinned_until_reload(tmp_path: Path) -> None:
    registry = build_registry(tmp_path, adapters=1, extras=False)
    resolver = ModelResolver(registry, registry.base("tiny"))
    assert resolver.resolve("lora0").adapter == "lora0@1"
    save_lora(registry.base("tiny").path, tmp_path / "v2", rank=2, seed=9)
    registry.register_adapter("lora0", tmp_path / "v2", "tiny", CardInfo(task_type="causal_lm"))
    assert resolver.resolve("lora0").adapter == "lora0@1"
    assert resolver.resolve("lora0@2").adapter == "lora0@2"
    assert resolver.reload() == 2
    assert resolver.resolve("lora0").adapter == "lora0@2"
    ids = [m.id for m in resolver.models(0, loaded=set())]
    assert ids == ["tiny", "lora0", "lora0@1", "lora0@2"]


def test_resolver_refusals(served_registry: Registry) -> None:
    resolver = ModelResolver(served_registry, served_registry.base("tiny"))
    assert resolver.resolve("tiny") == Target("tiny", None, None)
    with pytest.raises(UnknownModelError):
        resolver.resolve("ghost")
    with pytest.raises(UnknownModelError):
        resolver.resolve("../etc")
    with pytest.raises(FingerprintMismatchError):
        resolver.resolve("foreign0")
    with pytest.raises(UnsupportedError):
        resolver.generative("sentiment")
    with pytest.raises(UnsupportedError):
        resolver.classifier("lora1")
    assert resolver.classifier("sentiment").adapter == "sentiment@1"
    assert resolver.generative("soft").virtual_tokens == 4


def test_prompt_ids_match_the_engine(served_registry: Registry) -> None:
    engine = Engine(served_registry, "tiny")
    prompts = PromptBuilder(engine.tokenizer, engine.context_length)
    for text in ("", "hello world", "line\nbreak {json}"):
        assert len(prompts.text_ids(text)) == engine.count_tokens(Request(prompt=text))
    messages = [ChatMessage(role="system", content="s"), ChatMessage(role="user", content="hi")]
    turns = [{"role": m.role, "content": m.text} for m in messages]
    assert len(prompts.chat_ids(messages)) == engine.count_tokens(Request(messages=turns))


def test_chat_without_a_template_uses_a_transcript() -> None:
    tokenizer = char_tokenizer()
    tokenizer.chat_template = None
    prompts = PromptBuilder(tokenizer, 100)
    ids = prompts.chat_ids([ChatMessage(role="user", content="hi")])
    assert tokenizer.decode(ids) == "user: hi\nassistant:"


@settings(max_examples=60, deadline=None)
@given(prompt=st.integers(0, 80), virtual=st.integers(0, 8), requested=st.none() | st.integers(1, 100),
       default=st.integers(1, 64))
def test_budget_never_exceeds_the_context(prompt: int, virtual: int, requested: int | None, default: int) -> None:
    context = 64
    prompts = PromptBuilder(char_tokenizer(), context)
    from adapterhub_local.registry.cards import AdapterCard

    card = AdapterCard(name="p", version=1, kind="prompt", num_virtual_tokens=virtual) if virtual else None
    target = Target("m", "p@1" if card else None, card)
    try:
        budget = prompts.budget(prompt, target, requested, default)
    except PromptTooLongError:
        assert prompt + virtual >= context or (requested is not None and prompt + virtual + requested > context)
        return
    assert budget >= 1 and prompt + virtual + budget <= context
    assert budget == (requested if requested is not None else min(default, context - prompt - virtual))
