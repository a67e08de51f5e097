"""Pooling for sequence classifiers: which token states feed the classification head.

* ``native`` — the architecture's own head input (BERT: the pooler's tanh(dense(CLS)); decoders: the last
  real token), i.e. transformers' ``*ForSequenceClassification`` unchanged;
* ``cls`` / ``mean`` / ``last`` — the first real token, the mean over real tokens (the attention mask), the
  last real token of the backbone's final hidden states;
* ``auto`` — what the base itself declares: sentence-transformers bases name their pooling in
  ``modules.json`` → the Pooling module's ``config.json`` (all-MiniLM-L6-v2: mean); ``native`` otherwise.

:class:`PooledClassifier` runs a transformers classifier's own backbone and head with one of the other
poolings while keeping its module names (``bert.…``, ``classifier``), so PEFT directories, ``modules_to_save``
and state dicts are interchangeable with the plain transformers model. The inference engine pools the same
way (``inference/model_state.py``), so a head trained here scores the same there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from adapterhub_local.errors import FormatError, UnsupportedError

POOLINGS = ("auto", "native", "cls", "mean", "last")
"""Accepted in recipes (``task.pooling``)."""
RESOLVED = ("native", "cls", "mean", "last")
"""What ``auto`` resolves to; what cards record."""
ST_MODULES = "modules.json"
ST_POOLING_TYPE = "sentence_transformers.models.Pooling"
# sentence-transformers Pooling config flag → our name (the modes this package can reproduce).
_ST_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_lasttoken": "last",
             "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
             "pooling_mode_weightedmean_tokens": "weightedmean"}
HEAD_NAMES = ("classifier", "score")


def _read_object(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path} is not readable JSON ({exc})", "fix or remove the sentence-transformers files") \
            from exc


def _pooling_module_dir(model_dir: Path) -> str | None:
    """The relative directory of the Pooling module named in ``modules.json``, if any."""
    path = Path(model_dir) / ST_MODULES
    if not path.is_file():
        return None
    modules = _read_object(path)
    if not isinstance(modules, list):
        raise FormatError(f"{path} is not a list of modules", "fix or remove modules.json")
    for module in modules:
        if isinstance(module, dict) and module.get("type") == ST_POOLING_TYPE:
            rel = str(module.get("path", ""))
            if rel.startswith("/") or ".." in Path(rel).parts:
                raise FormatError(f"{path}: pooling module path {rel!r} leaves the model directory",
                                  "fix modules.json")
            return rel
    return None


def sentence_transformers_files(model_dir: Path) -> list[str]:
    """Relative paths of the files that declare a base's pooling (to keep when a base is copied)."""
    rel = _pooling_module_dir(model_dir)
    if rel is None:
        return []
    config = str(Path(rel) / "config.json")
    return [ST_MODULES, config] if (Path(model_dir) / config).is_file() else [ST_MODULES]


def declared_pooling(model_dir: Path) -> str | None:
    """The pooling a sentence-transformers base declares (``mean``, ``cls``, ``last``, or another mode's
    name), or ``None`` when the directory declares none."""
    rel = _pooling_module_dir(model_dir)
    if rel is None:
        return None
    path = Path(model_dir) / rel / "config.json"
    if not path.is_file():
        return None
    config = _read_object(path)
    if not isinstance(config, dict):
        raise FormatError(f"{path} is not a JSON object", "fix or remove the pooling config")
    modes = [name for flag, name in _ST_MODES.items() if config.get(flag) is True]
    if len(modes) != 1:
        return "+".join(modes) if modes else None
    return modes[0]


def resolve_pooling(requested: str, model_dir: Path) -> str:
    """``requested`` with ``auto`` replaced by the base's declared pooling (``native`` when none)."""
    if requested not in POOLINGS:
        raise UnsupportedError(f"unknown pooling {requested!r}", f"use one of {', '.join(POOLINGS)}")
    if requested != "auto":
        return requested
    declared = declared_pooling(model_dir)
    if declared is None:
        return "native"
    if declared not in RESOLVED:
        raise UnsupportedError(f"the base at {model_dir} declares {declared!r} pooling, which is not supported",
                               f"set task.pooling to one of {', '.join(RESOLVED)} in the recipe")
    return declared


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """``[B, L, H]`` hidden states and a ``[B, L]`` 0/1 mask → ``[B, H]`` (``cls``, ``mean`` or ``last``)."""
    mask = mask.to(hidden.dtype)
    if pooling == "mean":
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    real = torch.where(mask > 0, positions, -1 if pooling == "last" else mask.shape[1])
    if pooling == "cls":
        index = real.min(1).values
    elif pooling == "last":
        index = real.max(1).values
    else:
        raise UnsupportedError(f"pooling {pooling!r} has no token rule", "use cls, mean or last")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index.clamp(0, mask.shape[1] - 1)]


class PooledClassifier(torch.nn.Module):
    """A transformers sequence classifier whose head reads ``pooling`` of the backbone's last hidden states.

    Owns no weights of its own: the backbone and head are the wrapped model's modules, registered under the
    same names, so training this trains that model (which :meth:`unwrap` returns for ``save_pretrained``).
    """

    _model: torch.nn.Module

    def __init__(self, model: torch.nn.Module, pooling: str) -> None:
        super().__init__()
        if pooling not in ("cls", "mean", "last"):
            raise UnsupportedError(f"PooledClassifier needs cls, mean or last pooling, not {pooling!r}",
                                   "use the transformers model itself for native pooling")
        prefix = str(getattr(model, "base_model_prefix", ""))
        backbone = getattr(model, prefix, None) if prefix else None
        head_name = next((n for n in HEAD_NAMES if isinstance(getattr(model, n, None), torch.nn.Linear)), None)
        if not isinstance(backbone, torch.nn.Module) or head_name is None:
            raise UnsupportedError(f"cannot pool a {type(model).__name__} by {pooling!r}: it needs a backbone "
                                   "attribute and a single linear `classifier`/`score` head",
                                   "use pooling: native for this architecture")
        self.add_module(prefix, backbone)
        self.add_module(head_name, getattr(model, head_name))
        dropout = getattr(model, "dropout", None)
        self.dropout = dropout if isinstance(dropout, torch.nn.Dropout) else torch.nn.Identity()
        self.config = model.config
        self.pooling = pooling
        self._prefix, self._head_name = prefix, head_name
        # A plain reference, not a submodule: its parameters are already registered above.
        object.__setattr__(self, "_model", model)

    def unwrap(self) -> torch.nn.Module:
        """The wrapped transformers model (same parameter objects)."""
        return self._model

    def get_input_embeddings(self) -> torch.nn.Module:
        getter: Any = self._model.get_input_embeddings
        embeddings: torch.nn.Module = getter()
        return embeddings

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, **_: Any) -> Any:
        """transformers' ``SequenceClassifierOutput`` (``loss`` when ``labels`` are given, ``logits`` ``[B, C]``)."""
        from transformers.modeling_outputs import SequenceClassifierOutput
        backbone = getattr(self, self._prefix)
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        out = backbone(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **extra)
        hidden = out.last_hidden_state  # [B, L, H]
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        pooled = pool(hidden, attention_mask, self.pooling)
        logits = getattr(self, self._head_name)(self.dropout(pooled))
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits.float(), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)


def with_pooling(model: torch.nn.Module, pooling: str) -> torch.nn.Module:
    """``model`` itself for ``native`` pooling, else a :class:`PooledClassifier` around it."""
    return model if pooling == "native" else PooledClassifier(model, pooling)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a :class:`PooledClassifier` (``model`` itself otherwise)."""
    return model.unwrap() if isinstance(model, PooledClassifier) else model
