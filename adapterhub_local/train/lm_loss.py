"""The causal-LM training loss without the full-vocabulary logits: the LM head runs only on the positions that
have a target (completion tokens, never padding or prompt), and the cross entropy over them runs in fp32 a few rows
at a time (:mod:`.chunked_ce`), per token, summed in fp32.

Why: on the SmolLM2-135M shape (49,152-token vocabulary) the model's own loss upcasts logits for every position,
padding included, to fp32 — the log-softmax and its backward over ``batch × width × vocab`` fp32 values were a
fifth of a bf16 training step (``benchmarks/train_throughput.py`` profile). Here they cover only the labelled
positions, and never all of them in fp32 at once. (CPU autocast runs ``F.cross_entropy`` in fp32 too, after
copying the whole bf16 logits to fp32; the chunks avoid that copy and the fp32 activation it kept.)

The result equals ``model(**inputs).loss`` (the mean over labelled positions of the next-token cross entropy,
HF's ``ForCausalLMLoss``) up to the rounding of the bf16 logits and of fp32 sums taken in another order.
The fast path is taken only where the model's forward is exactly "backbone, then LM head" (checked by
:func:`supports`); anything else (prompt-learning PEFT methods, logit soft-capping or scaling, classifiers,
multi-process runs, FSDP-sharded parameters) keeps the model's own loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from adapterhub_local.train.chunked_ce import cross_entropy_per_token
from adapterhub_local.train.tasks import IGNORE

_LOGIT_CHANGERS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")
"""Config attributes of architectures whose forward changes the LM head's output before the loss."""


def _language_model(model: torch.nn.Module) -> Any:
    """The ``*ForCausalLM`` under a PEFT wrapper (LoRA-style PEFT injects into its modules), or ``None``."""
    get_base = getattr(model, "get_base_model", None)
    if get_base is not None:
        config = getattr(model, "active_peft_config", None)
        if config is None or getattr(config, "is_prompt_learning", False):
            return None  # soft prompts prepend virtual tokens in the PEFT wrapper's own forward
        return get_base()
    return model


def _parts(model: torch.nn.Module) -> tuple[Any, Any] | None:
    """``(backbone, lm_head)`` of a plain causal LM, or ``None`` where the fast path does not apply."""
    lm = _language_model(model)
    if lm is None or not getattr(lm, "_is_causal_lm_for_fast_loss", _looks_causal(lm)):
        return None
    config = getattr(lm, "config", None)
    if config is None or any(getattr(config, name, None) not in (None, 1.0) for name in _LOGIT_CHANGERS):
        return None
    prefix = getattr(lm, "base_model_prefix", "")
    backbone = getattr(lm, prefix, None) if prefix else None
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if backbone is None or not isinstance(head, torch.nn.Linear):
        return None
    return backbone, head


def _looks_causal(lm: Any) -> bool:
    return type(lm).__name__.endswith("ForCausalLM") or type(lm).__name__ == "GPT2LMHeadModel"


def _sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP2 shards ``model``'s parameters (DTensors): only the root module's own forward gathers them,
    so its backbone and head cannot be called on their own."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without distributed support shards nothing
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def supports(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> bool:
    """Whether :func:`causal_lm_loss` computes this model's loss for these inputs."""
    labels = inputs.get("labels")
    return labels is not None and labels.dim() == 2 and _parts(model) is not None and not _sharded(model)


@dataclass(frozen=True)
class Targets:
    """The labelled positions of a batch, found on the host before the batch moves to the device (so the
    device never has to report a count back): flat indices into ``[rows, width - 1]`` of the positions whose
    next token is labelled, those tokens, and each one's batch row."""

    positions: torch.Tensor
    tokens: torch.Tensor
    rows: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.positions.shape[0])

    def to(self, device: torch.device | str) -> Targets:
        return Targets(*(t.to(device, non_blocking=True) for t in (self.positions, self.tokens, self.rows)))


def label_targets(labels: torch.Tensor) -> Targets:
    """:class:`Targets` of ``labels`` (``[rows, width]``, -100 where there is no target); position ``t``
    predicts token ``t + 1``, as HF's causal-LM loss shifts them."""
    shifted = labels[:, 1:]
    flat = shifted.reshape(-1)
    positions = (flat != IGNORE).nonzero(as_tuple=True)[0]
    return Targets(positions, flat[positions], positions // max(shifted.shape[1], 1))


def labelled_hidden(model: torch.nn.Module, inputs: dict[str, torch.Tensor], targets: Targets) -> tuple[
        torch.Tensor, Any]:
    """Run the backbone on ``inputs`` (without ``labels``); return the hidden states of ``targets``'
    positions (``[n, hidden]``) and the LM head."""
    parts = _parts(model)
    if parts is None:
        raise ValueError("this model's loss needs its own forward (see lm_loss.supports)")
    backbone, head = parts
    rest = {k: v for k, v in inputs.items() if k != "labels"}
    hidden = backbone(**rest, use_cache=False).last_hidden_state
    flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    return flat.index_select(0, targets.positions), head


def token_losses(hidden: torch.Tensor, tokens: torch.Tensor, head: Any) -> torch.Tensor:
    """Per-token next-token cross entropy (fp32 values) of the labelled positions: the LM head in the compute
    dtype (bf16 under autocast), the cross entropy in fp32 a few rows at a time (:mod:`.chunked_ce`: never the
    whole ``n × vocab`` in fp32); callers sum them in fp32."""
    return cross_entropy_per_token(head(hidden), tokens)


def causal_lm_loss(model: torch.nn.Module, inputs: dict[str, torch.Tensor], targets: Targets) -> torch.Tensor:
    """``model(**inputs).loss`` of a causal LM (mean next-token cross entropy over labelled positions);
    ``targets`` from :func:`label_targets` of the batch's labels (on the host), moved to the device."""
    hidden, head = labelled_hidden(model, inputs, targets)
    return token_losses(hidden, targets.tokens, head).sum() / max(targets.count, 1)
