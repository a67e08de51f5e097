"""FSDP sharding (``train/sharding.py``), in two gloo processes started by the test: each process holds half of
every block's weights; the trainable state read from the shards is the whole, unsharded state on every process and
loads back exactly; the optimizer state goes to the one-process layout and back to the same shards."""

from __future__ import annotations

import multiprocessing
import os
import socket
from typing import Any, cast

import pytest
import torch

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tiny_lora() -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.1)  # B too (PEFT starts it at zero): every tensor distinct
    return model


def _peer(rank: int, port: int, out: Any) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(WORLD), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    torch.distributed.init_process_group("gloo")
    try:
        from torch.distributed.tensor import DTensor

        from adapterhub_local.train import sharding
        from adapterhub_local.train.methods import load_trainable_state, trainable_state

        model = _tiny_lora()
        before = trainable_state(model)
        total = sum(p.numel() for p in model.parameters())
        blocks = sharding.shard(model)
        local = torch.tensor([sum(cast(DTensor, p).to_local().numel() for p in model.parameters())])
        torch.distributed.all_reduce(local)
        owned = sum(cast(DTensor, p).to_local().numel() for p in model.parameters())
        sharded = all(sharding.is_sharded(p) for p in model.parameters())
        after = trainable_state(model)  # gathered: a collective
        same_state = after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
        load_trainable_state(model, {k: v * 2 for k, v in before.items()})
        reloaded = trainable_state(model)
        loads_back = all(torch.equal(reloaded[k], before[k] * 2) for k in before)

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        ids = torch.arange(12).reshape(2, 6) + rank
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        whole = sharding.full_optimizer_state(optimizer.state_dict())
        whole_shapes = all(v["exp_avg"].shape == p.shape and not sharding.is_sharded(v["exp_avg"])
                           for v, p in zip(whole["state"].values(), params, strict=True))
        fresh = torch.optim.AdamW(params, lr=1e-2)
        fresh.load_state_dict(whole)
        sharding.reshard_optimizer_state(fresh)
        same_shards = all(torch.equal(fresh.state[p][k].to_local(), optimizer.state[p][k].to_local())
                          for p in params for k in ("exp_avg", "exp_avg_sq"))
        out.put((rank, {"blocks": blocks, "total": total, "sum_local": int(local.item()), "owned": owned,
                        "sharded": sharded, "same_state": same_state, "loads_back": loads_back,
                        "whole_shapes": whole_shapes, "same_shards": same_shards}))
    except Exception as exc:  # report it to the test rather than hang it
        out.put((rank, {"error": repr(exc)}))
    finally:
        torch.distributed.destroy_process_group()


def test_each_process_holds_its_share_and_saves_see_the_whole() -> None:
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    port = _free_port()
    procs = [context.Process(target=_peer, args=(rank, port, out)) for rank in range(WORLD)]
    for p in procs:
        p.start()
    try:
        reports = dict(out.get(timeout=120) for _ in range(WORLD))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    for rank, report in reports.items():
        assert "error" not in report, (rank, report)
        assert report["blocks"] == 2 and report["sharded"]
        assert report["sum_local"] == report["total"]  # the shards partition the model
        assert report["owned"] <= report["total"] // WORLD + 64  # half of it here (one row of padding per tensor)
        assert report["same_state"] and report["loads_back"]
        assert report["whole_shapes"] and report["same_shards"]


@pytest.mark.parametrize(("method", "precision", "init", "fine"), [
    ("lora", "bf16", "default", True), ("lora", "fp32", "gaussian", True), ("full", "fp32", "default", False),
    ("lora", "fp16", "default", False), ("lora", "fp32", "pissa", False)])
def test_fsdp_trains_lora_only(method: str, precision: str, init: str, fine: bool) -> None:
    from adapterhub_local.errors import UnsupportedError
    from adapterhub_local.train import sharding

    if fine:
        sharding.check_supported(method, precision, init)
    else:
        with pytest.raises(UnsupportedError, match="under FSDP"):
            sharding.check_supported(method, precision, init)
