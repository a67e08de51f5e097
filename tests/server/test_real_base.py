"""The server on the real SmolLM2-135M-Instruct (slow: real weights, real tokenizer and chat template):
the ``openai`` client's chat answers equal the engine's, streamed or not, with the template's token count."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from adapterhub_local.inference.engine import Engine
from adapterhub_local.inference.types import Request, SamplingParams
from adapterhub_local.registry import BaseRecord, CardInfo, Registry
from adapterhub_local.server import create_app
from tests.server.conftest import live_server

pytestmark = pytest.mark.slow


def test_chat_on_smollm2_matches_the_engine(registry: Registry, tmp_path: Path, smollm2_base: BaseRecord) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    record = registry.add_base("smollm2", str(smollm2_base.path))
    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(record.path),
                                LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "lora"))
    del peft_model
    registry.register_adapter("chatty", tmp_path / "lora", "smollm2", CardInfo(task_type="causal_lm"))

    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is the capital of France?"}]
    turns = [{"role": str(m["role"]), "content": str(m.get("content"))} for m in messages]
    reference = Engine(registry, "smollm2")
    params = SamplingParams(max_new_tokens=8)
    expected = {adapter: reference.generate([Request(messages=turns, adapter=adapter, sampling=params)])[0]
                for adapter in (None, "chatty")}
    prompt_tokens = reference.count_tokens(Request(messages=turns))
    del reference

    app = create_app(Engine(registry, "smollm2"), registry, "smollm2")
    with live_server(app, timeout_s=120) as url, OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0,
                                                        timeout=120) as client:
        for model, adapter in (("smollm2", None), ("chatty", "chatty")):
            out = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
            assert out.choices[0].message.content == expected[adapter].text
            assert out.usage is not None and out.usage.prompt_tokens == prompt_tokens
        stream = client.chat.completions.create(model="chatty", messages=messages, max_tokens=8, temperature=0,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream) == expected["chatty"].text
        assert {m.id for m in client.models.list()} >= {"smollm2", "chatty", "chatty@1"}
