"""LoRA-family kinds trained from a recipe: ``method.use_dora`` trains DoRA, the registered version carries its
magnitudes, and the engine (swap and merge) reproduces the trained model's logits."""

from __future__ import annotations

from pathlib import Path

import torch

from adapterhub_local.inference import Engine, Request
from adapterhub_local.registry import Registry
from adapterhub_local.train import runner
from adapterhub_local.train.checks import check
from tests.train.conftest import build_recipe, gen_raw


def test_a_dora_recipe_trains_registers_and_serves_exactly(tmp_path: Path, llama_tok_registry: Registry,
                                                           gen_data: Path) -> None:
    recipe = build_recipe(gen_raw(gen_data, tmp_path / "runs", use_dora=True))
    result = runner.run(recipe, check(recipe), llama_tok_registry, progress=False)
    assert result.card is not None and result.model is not None
    loaded = llama_tok_registry.load_adapter(result.card.ref)
    assert loaded.config["use_dora"] is True
    assert sum(k.endswith("lora_magnitude_vector") for k in loaded.tensors) == 2 * 2  # 2 layers × q, v
    ids = torch.randint(5, 60, (7,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        trained = result.model.eval()(input_ids=torch.tensor([ids])).logits[0].float()
    for mode in ("swap", "merge"):
        engine = Engine(llama_tok_registry, "tllama", mode=mode)  # type: ignore[arg-type]
        got = engine.logits([Request(prompt=ids, adapter=result.card.ref)])[0].logits
        torch.testing.assert_close(got, trained, atol=1e-5, rtol=0)
