"""Training recipes: typed dataclasses, YAML loading, ``key=value`` overrides and static validation.

A recipe is YAML whose sections mirror the dataclasses below (``task``, ``data``, ``method``, ``train``,
``eval``, ``output``). Parsing never stops at the first problem: unknown fields, wrong types and bad
values are all collected, and :func:`load_recipe` raises one :class:`ConfigError` listing every one.
Checks that need the data itself (template fields, labels) live in ``train/checks.py`` and join the
same list there.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from adapterhub_local.errors import ConfigError

TASK_TYPES = ("classification", "generation")
METHODS = ("lora", "qlora", "prompt", "head_only", "freeze_first_k", "full")
POOLINGS = ("auto", "native", "cls", "mean", "last")  # adapterhub_local/pooling.py implements them
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AutoSwitch = typing.NewType("AutoSwitch", str)
"""A setting that is ``auto``, ``true`` or ``false``; YAML booleans (``true``, ``no`` …) are accepted."""
AUTO_SWITCH = ("auto", "true", "false")
LORA_INITS = ("default", "gaussian", "pissa", "olora", "eva")
MUTATING_INITS = ("pissa", "olora")
"""Inits that move the base's weights (``W_res = W - B0·A0``); the stored adapter is converted (rank 2r)."""
PROMPT_INITS = ("random", "text", "vocab")
DATA_FORMATS = ("auto", "jsonl", "csv", "datasets")
ASSET_PREFIX = "asset:"


@dataclass
class DataSource:
    """One dataset inside a multi-task mix (generation)."""

    path: str = ""
    """JSONL file, CSV file, saved ``datasets`` directory, or ``asset:<name>``."""
    name: str = ""
    """Short name used in logs and per-dataset metrics (default: the file stem)."""
    format: str = "auto"
    fields: dict[str, str] = field(default_factory=dict)
    """Rename columns: ``{name_in_template: column_in_file}``."""
    template: str = "{input}"
    """Prompt template, Python ``str.format`` style over the (renamed) fields."""
    completion: str = "{output}"
    """Completion template; the loss is computed on these tokens only."""
    weight: float = 1.0
    """Relative share of this dataset in each training epoch."""
    split_by: str | None = None
    """Field whose values never straddle train and validation (e.g. ``mr``)."""


@dataclass
class DataConfig:
    """Where the examples come from and how they become model inputs."""

    train: str = ""
    """Training data: JSONL, CSV, a saved ``datasets`` directory, or ``asset:<name>``."""
    validation: str | None = None
    """Validation data; when absent it is split off ``train`` (by ``split_by`` groups)."""
    test: str | None = None
    """Held-out test data; when absent it is split off ``train`` (by ``split_by`` groups)."""
    format: str = "auto"
    fields: dict[str, str] = field(default_factory=dict)
    """Rename columns: ``{name_used_in_recipe: column_in_file}``."""
    text_field: str = "text"
    """Classification: the input text field (ignored when ``template`` is set)."""
    label_field: str = "label"
    template: str | None = None
    """Classification: optional input template; generation: the prompt template (e.g. ``"{mr}\\n"``)."""
    completion: str | None = None
    """Generation: the completion template (e.g. ``"{ref}"``); loss on these tokens only."""
    split_by: str | None = None
    """Field whose groups are never split across train/validation/test (``movie``, ``mr``)."""
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 0
    max_length: int = 128
    """Tokens per example (prompt + completion), longer ones are truncated."""
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    """Cap on validation examples (per dataset) used for periodic evaluation."""
    packing: bool = False
    """Generation: concatenate examples into full ``max_length`` rows instead of padding."""
    mix: list[DataSource] = field(default_factory=list)
    """Generation: several datasets mixed with per-dataset template and weight (overrides ``train``)."""


@dataclass
class TaskConfig:
    """What is learned and how it is scored."""

    type: str = "classification"
    """``classification`` or ``generation``."""
    name: str = ""
    """Task name recorded on the card (default: the recipe name)."""
    labels: list[str] | None = None
    """Class labels in head order (default: sorted labels found in the training data)."""
    pooling: str = "auto"
    """``auto`` (the base's declared pooling, e.g. sentence-transformers' ``mean``; else ``native``), ``native``
    (the architecture's own head input), ``cls``, ``mean`` or ``last`` (real tokens of the last hidden states)."""


@dataclass
class MethodConfig:
    """The parameter-efficient method (or baseline) to train."""

    name: str = "lora"
    """``lora``, ``qlora``, ``prompt``, ``head_only``, ``freeze_first_k`` or ``full``."""
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | None = None
    """Module names to adapt (default: the architecture's attention query/value)."""
    use_rslora: bool = False
    """rsLoRA scaling ``alpha / sqrt(r)``."""
    use_dora: bool = False
    """DoRA: also learn a magnitude per output feature (PEFT ``use_dora``); served exactly by the engine."""
    init: str = "default"
    """LoRA init (PEFT's own): ``default`` (Kaiming-uniform A, zero B), ``gaussian``, ``pissa`` / ``olora`` (from the
    weights' SVD / QR; converted at registration to a rank-2r LoRA on the unchanged base) or ``eva`` (from a pass
    over the training data)."""
    num_virtual_tokens: int = 20
    prompt_init: str = "random"
    """Soft-prompt init: ``random``, ``text`` (from ``prompt_init_text``) or ``vocab`` (sampled tokens)."""
    prompt_init_text: str | None = None
    k: int = 0
    """``freeze_first_k``: number of bottom transformer layers (plus embeddings) kept frozen."""
    modules_to_save: list[str] | None = None
    """``lora``: extra modules trained as full copies (PEFT ``modules_to_save``, e.g. ``lm_head``); the engine serves
    such a copy in merge mode only (a per-row LM head is ``vocab × hidden`` per adapter)."""
    trainable_tokens: list[int] | None = None
    """``lora``: token ids whose input-embedding rows are trained (PEFT ``trainable_token_indices``); served per row
    in swap mode and merged in merge mode. An embedding LoRA is asked for by naming the embedding in
    ``target_modules`` (e.g. ``embed_tokens``)."""


@dataclass
class TrainConfig:
    """Optimizer, schedule and loop control."""

    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    warmup_steps: int | None = None
    """Overrides ``warmup_ratio`` when set."""
    batch_size: int = 16
    grad_accum: int = 1
    group_by_length: bool = False
    """Batch examples of similar length together (less padding); the order stays seeded and random."""
    epochs: float = 1.0
    max_steps: int | None = None
    """Optimizer steps; overrides ``epochs`` when set."""
    eval_every: int | None = None
    """Evaluate every N optimizer steps (default: once per epoch)."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations without improvement."""
    metric_for_best: str | None = None
    """Metric choosing the best checkpoint (default: ``accuracy`` / ``val_loss``)."""
    seed: int = 0
    precision: str = "auto"
    """``auto`` = bf16 where the device multiplies bf16 natively (CUDA; CPUs with AMX-BF16/AVX512-BF16), else
    fp32. Under bf16 the frozen base weights are bf16; trainable parameters and optimizer state stay fp32."""
    max_grad_norm: float = 1.0
    log_every: int = 10
    compile: AutoSwitch = AutoSwitch("auto")
    """``torch.compile`` the base's blocks while training: ``auto`` where it pays (long CPU runs on bases of
    20M+ parameters; ``train/compilation.py``), ``true``, ``false``."""
    padding_free: AutoSwitch = AutoSwitch("auto")
    """Lay each causal-LM micro-batch's sequences end to end in one row (no padding; each still attends to itself
    alone): ``auto``/``true`` where it applies (``train/padding_free.py``; ``true`` refuses a run where it does not),
    ``false`` keeps padded batches. The same loss up to rounding."""
    num_threads: int | None = None
    """torch CPU threads (default: one per usable core); ``--threads``/``$ADAPTERHUB_THREADS`` win over it."""


@dataclass
class EvalConfig:
    """Final evaluation."""

    batch_size: int = 32
    max_new_tokens: int = 64
    max_test_examples: int | None = None
    """Cap on test inputs in the final evaluation (generation: distinct prompts, whose references all count
    in the test loss)."""
    forgetting: bool = True
    """Generation: record base vs base+adapter perplexity on a general text sample."""
    forgetting_data: str = "asset:general_text"
    forgetting_samples: int = 64
    show_predictions: int = 5
    compare_base: bool = False
    """Generation: also score the untuned base on the test prompts (doubles the generation time)."""


@dataclass
class OutputConfig:
    """Where results go."""

    runs_dir: str = "runs"
    register: bool = True
    tag: str | None = None
    """Tag the registered version (e.g. ``latest-good``)."""


@dataclass
class Recipe:
    """A full training recipe."""

    name: str = ""
    """Adapter name in the registry (and run directory prefix)."""
    base: str = ""
    """Registered base model name."""
    base_source: str | None = None
    """Registered automatically when ``base`` is missing: a model dir, a .gguf, or ``asset:<name>``."""
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def non_default_fields(self) -> dict[str, Any]:
        """The recipe as a nested dict of only the values that differ from a fresh ``Recipe()``: an identity that
        stays the same when a later version adds a field with a default (a sweep keeps resuming across upgrades)."""
        return recipe_values_off_default(self.to_dict())

    @property
    def task_name(self) -> str:
        return self.task.name or self.name


def recipe_values_off_default(values: dict[str, Any]) -> dict[str, Any]:
    """A recipe dict (``Recipe.to_dict()``, possibly stored by an older version) reduced to the values that differ
    from today's defaults: two versions of the same recipe compare equal however many fields were added since."""
    return _differences(values, Recipe().to_dict())


def _differences(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        default = defaults.get(key)
        if isinstance(value, dict) and isinstance(default, dict):
            nested = _differences(value, default)
            if nested:
                out[key] = nested
        elif key not in defaults or value != default:
            out[key] = value
    return out


# ------------------------------------------------------------------ parsing
def _coerce(value: Any, hint: Any, where: str, problems: list[str]) -> Any:
    """Check/convert ``value`` against a type hint; record a problem and return None when it does not fit."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where, problems)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {value!r}")
            return hint()  # type: ignore[operator]
        return _build(hint, value, where, problems)  # type: ignore[arg-type]
    if origin is list:
        if isinstance(value, str) and args and args[0] is str:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {value!r}")
            return []
        return [_coerce(v, args[0], f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {value!r}")
            return {}
        return {str(k): str(v) for k, v in value.items()}
    if hint is AutoSwitch:
        if isinstance(value, bool):
            return AutoSwitch("true" if value else "false")
        if isinstance(value, str) and value.strip().lower() in AUTO_SWITCH:
            return AutoSwitch(value.strip().lower())
        problems.append(f"{where}: expected one of {', '.join(AUTO_SWITCH)}, got {value!r}")
        return None
    if hint is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{where}: expected true/false, got {value!r}")
        return None
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        problems.append(f"{where}: expected an integer, got {value!r}")
        return None
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        problems.append(f"{where}: expected a number, got {value!r}")
        return None
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        problems.append(f"{where}: expected a string, got {value!r}")
        return None
    return value


def _build(cls: type[Any], data: dict[str, Any], where: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in hints:
            prefix = f"{where}." if where else ""
            problems.append(f"unknown field {prefix}{key!r} (known: {', '.join(names)})")
    kwargs: dict[str, Any] = {}
    for name in names:
        if name in data:
            sub = f"{where}.{name}" if where else name
            value = _coerce(data[name], hints[name], sub, problems)
            if value is not None or data[name] is None:
                kwargs[name] = value
    return cls(**kwargs)


def apply_overrides(raw: dict[str, Any], overrides: dict[str, str]) -> dict[str, Any]:
    """Set dotted keys (``train.lr=1e-4``) in a raw recipe dict; values are parsed as YAML scalars/lists."""
    out = _deep_copy(raw)
    for key, text in overrides.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = yaml.safe_load(text) if text != "" else None
    return out


def _deep_copy(raw: dict[str, Any]) -> dict[str, Any]:
    import copy

    return copy.deepcopy(raw)


def parse_recipe(raw: dict[str, Any]) -> tuple[Recipe, list[str]]:
    """Build a :class:`Recipe` from a raw dict; returns it with every structural and value problem found."""
    problems: list[str] = []
    recipe: Recipe = _build(Recipe, raw, "", problems)
    problems.extend(static_problems(recipe))
    return recipe, problems


def read_recipe_file(path: Path | str) -> dict[str, Any]:
    """The raw YAML mapping of a recipe file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"recipe file {path} does not exist"], "give the path of a YAML recipe", what="recipe")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path} is not valid YAML: {exc}"], "fix the YAML syntax", what="recipe") from exc
    if not isinstance(raw, dict):
        raise ConfigError([f"{path} must hold a mapping at top level"], "see recipes/*.yaml", what="recipe")
    return raw


def load_recipe(path: Path | str, overrides: dict[str, str] | None = None) -> Recipe:
    """Read a YAML recipe, apply overrides, and raise one :class:`ConfigError` listing every static problem."""
    raw = apply_overrides(read_recipe_file(path), overrides or {})
    recipe, problems = parse_recipe(raw)
    if not recipe.name:
        recipe.name = Path(path).stem
    if problems:
        raise ConfigError(problems, "fix the recipe (or the key=value overrides) and run again", what="recipe")
    return recipe


# --------------------------------------------------------------- validation
def _one_of(value: str, allowed: tuple[str, ...], where: str) -> list[str]:
    return [] if value in allowed else [f"{where} = {value!r} is not one of {', '.join(allowed)}"]


def _path_problem(path: str | None, where: str) -> list[str]:
    if not path or path.startswith(ASSET_PREFIX):
        return []
    if not Path(path).exists():
        return [f"{where}: file {path} does not exist"]
    return []


def qlora_problem() -> str | None:
    """Why QLoRA cannot run here (None when it can): it needs bitsandbytes with a backend for this machine."""
    import torch

    if importlib.util.find_spec("bitsandbytes") is None:
        return ("method qlora needs bitsandbytes, which is not installed "
                "(it runs on CUDA; use method.name=lora here, or install adapterhub_local[cuda] on a GPU machine)")
    if torch.cuda.is_available():
        return None
    try:  # recent bitsandbytes builds have a CPU backend for 4-bit; older ones only work on CUDA
        import bitsandbytes.functional as bnbf

        bnbf.quantize_4bit(torch.zeros(64, 64), quant_type="nf4")
    except Exception as exc:
        return (f"method qlora: the installed bitsandbytes cannot quantize to 4-bit NF4 on this CPU-only machine "
                f"({type(exc).__name__}); use method.name=lora here, or run on a CUDA GPU")
    return None


def _module_kind_problems(m: MethodConfig) -> list[str]:
    """``modules_to_save`` / ``trainable_tokens``: LoRA only, well-formed, not with a base-moving init."""
    p: list[str] = []
    asked = [f for f, v in (("modules_to_save", m.modules_to_save), ("trainable_tokens", m.trainable_tokens)) if v]
    if asked and m.name != "lora":
        p.append(f"method.{asked[0]} is for method lora (got {m.name!r})")
    if asked and m.init in MUTATING_INITS:
        p.append(f"method.{asked[0]} with init {m.init!r}: the conversion to the unchanged base covers LoRA pairs "
                 "only; use init default, gaussian or eva")
    if m.modules_to_save is not None and (not isinstance(m.modules_to_save, list) or not all(
            isinstance(x, str) and x for x in m.modules_to_save)):
        p.append("method.modules_to_save must be a list of module names")
    tokens = m.trainable_tokens
    if tokens is not None:
        if not isinstance(tokens, list) or not tokens or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens):
            p.append("method.trainable_tokens must be a non-empty list of token ids >= 0")
        elif len(set(tokens)) != len(tokens):
            p.append(f"method.trainable_tokens lists an id twice ({tokens})")
    if tokens and any(t in ("embed_tokens", "wte", "word_embeddings") for t in m.target_modules or []):
        p.append("method.trainable_tokens and an embedding in method.target_modules: train one of them")
    return p


def static_problems(recipe: Recipe) -> list[str]:
    """Problems visible without reading the data (values, choices, files present, method availability)."""
    p: list[str] = []
    if not recipe.base:
        p.append("base: missing (name of a registered base model)")
    p += _one_of(recipe.task.type, TASK_TYPES, "task.type")
    p += _one_of(recipe.task.pooling, POOLINGS, "task.pooling")
    m = recipe.method
    p += _one_of(m.name, METHODS, "method.name")
    if m.name in ("lora", "qlora"):
        if m.r is not None and m.r < 1:
            p.append(f"method.r = {m.r}: the LoRA rank must be at least 1")
        if m.alpha is not None and m.alpha <= 0:
            p.append(f"method.alpha = {m.alpha}: must be positive")
        if m.dropout is not None and not 0 <= m.dropout < 1:
            p.append(f"method.dropout = {m.dropout}: must be in [0, 1)")
        p += _one_of(m.init, LORA_INITS, "method.init")
        if m.init in MUTATING_INITS and (m.name == "qlora" or m.use_dora):
            p.append(f"method.init = {m.init!r} changes the base's weights, and with "
                     f"{'a 4-bit base' if m.name == 'qlora' else 'DoRA (magnitudes of W_res)'} the adapter cannot "
                     "be converted exactly to one on the unchanged base: use init default, gaussian or eva")
    p += _module_kind_problems(m)
    if m.name == "qlora":
        reason = qlora_problem()
        if reason:
            p.append(reason)
    if m.name == "prompt":
        if recipe.task.type != "generation":
            p.append("method prompt (prompt tuning) is for generation tasks; use lora or head_only for classification")
        if m.num_virtual_tokens is not None and m.num_virtual_tokens < 1:
            p.append(f"method.num_virtual_tokens = {m.num_virtual_tokens}: must be at least 1")
        p += _one_of(m.prompt_init, PROMPT_INITS, "method.prompt_init")
        if m.prompt_init == "text" and not m.prompt_init_text:
            p.append("method.prompt_init = 'text' needs method.prompt_init_text")
    if m.name == "head_only" and recipe.task.type != "classification":
        p.append("method head_only trains a classification head; the task is not classification")
    if m.name == "freeze_first_k" and (m.k is None or m.k < 0):
        p.append(f"method.k = {m.k}: must be >= 0")
    t = recipe.train
    if t.lr is not None and t.lr <= 0:
        p.append(f"train.lr = {t.lr}: must be positive")
    for name in ("batch_size", "grad_accum", "log_every"):
        value = getattr(t, name)
        if value is not None and value < 1:
            p.append(f"train.{name} = {value}: must be at least 1")
    if t.max_steps is not None and t.max_steps < 1:
        p.append(f"train.max_steps = {t.max_steps}: must be at least 1")
    if t.max_steps is None and (t.epochs is None or t.epochs <= 0):
        p.append("train: give epochs > 0 or max_steps")
    if t.eval_every is not None and t.eval_every < 1:
        p.append(f"train.eval_every = {t.eval_every}: must be at least 1")
    if not 0 <= (t.warmup_ratio or 0) < 1:
        p.append(f"train.warmup_ratio = {t.warmup_ratio}: must be in [0, 1)")
    p += _one_of(t.precision, PRECISIONS, "train.precision")
    if t.num_threads is not None and t.num_threads < 1:
        p.append(f"train.num_threads = {t.num_threads}: must be at least 1 (or leave it out)")
    d = recipe.data
    p += _one_of(d.format, DATA_FORMATS, "data.format")
    if not d.train and not d.mix:
        p.append("data.train: missing (a JSONL/CSV file, a datasets directory, or asset:<name>)")
    p += _path_problem(d.train, "data.train")
    p += _path_problem(d.validation, "data.validation")
    p += _path_problem(d.test, "data.test")
    for i, source in enumerate(d.mix):
        p += _path_problem(source.path, f"data.mix[{i}].path")
        if not source.path:
            p.append(f"data.mix[{i}].path: missing")
        if source.weight is not None and source.weight <= 0:
            p.append(f"data.mix[{i}].weight = {source.weight}: must be positive")
    if d.mix and recipe.task.type != "generation":
        p.append("data.mix (multi-dataset mixing) is for generation tasks")
    fractions = (d.validation_fraction or 0) + (d.test_fraction or 0)
    if not 0 <= fractions < 1:
        p.append(f"data.validation_fraction + data.test_fraction = {fractions}: must be in [0, 1)")
    if recipe.task.type == "generation" and not d.mix and (not d.template or not d.completion):
        p.append("generation needs data.template (the prompt) and data.completion (the target)")
    if d.max_length is not None and d.max_length < 8:
        p.append(f"data.max_length = {d.max_length}: must be at least 8")
    if recipe.task.labels is not None and len(set(recipe.task.labels)) < 2:
        p.append("task.labels: give at least two distinct labels")
    return p
