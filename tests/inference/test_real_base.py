"""The engine on the real SmolLM2-135M-Instruct (slow: real weights and tokenizer, still small)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapterhub_local.inference import Engine, Request, SamplingParams
from adapterhub_local.registry import BaseRecord, CardInfo, Registry

pytestmark = pytest.mark.slow


def test_smollm2_chat_generation_matches_peft(registry: Registry, tmp_path: Path, smollm2_base: BaseRecord) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    record = registry.add_base("smollm2", str(smollm2_base.path))
    torch.manual_seed(0)
    peft_model: PeftModel = get_peft_model(AutoModelForCausalLM.from_pretrained(record.path),
                                            LoraConfig(r=8, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "lora"))
    registry.register_adapter("chatty", tmp_path / "lora", "smollm2", CardInfo(task_type="causal_lm"))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(record.path), tmp_path / "lora")
    engine = Engine(registry, "smollm2")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = engine.runner.encode(Request(messages=messages))
    assert "France" in engine.runner.tokenizer.decode(ids) and len(ids) > 10  # the template wrapped the message
    params = SamplingParams(max_new_tokens=8, stop_at_eos=False)
    rows = engine.generate([Request(messages=messages, adapter="chatty", sampling=params),
                            Request(prompt="The capital of France is", sampling=params)])
    with torch.no_grad():
        out = peft_model.eval().generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                         dtype=torch.long), max_new_tokens=8, do_sample=False)
    assert rows[0].token_ids == out[0, len(ids):].tolist()
    assert rows[0].text == engine.runner.tokenizer.decode(rows[0].token_ids, skip_special_tokens=True)
    assert rows[1].completion_tokens == 8 and rows[1].text.strip()
