"""Sweep planning: ranks, alpha policies, over-complete marking, deterministic ids."""

from __future__ import annotations

import pytest

from adapterhub_local.config import parse_recipe
from adapterhub_local.errors import ConfigError
from adapterhub_local.lora import lora_scale
from adapterhub_local.sweep.plan import DEFAULT_RANKS, SweepConfig, parse_ranks, plan_sweep, target_dims

RAW = {"name": "e2e", "base": "b", "task": {"type": "generation"},
       "data": {"train": "asset:e2e", "template": "{mr}", "completion": "{ref}"},
       "method": {"name": "lora", "r": 4, "alpha": 32}}
DIMS = {"q_proj": (576, 576), "v_proj": (576, 192)}


def _recipe():  # type: ignore[no-untyped-def]
    recipe, problems = parse_recipe(RAW)
    assert not problems
    return recipe


def test_default_ranks_are_powers_of_two_to_1024() -> None:
    assert parse_ranks(None) == list(DEFAULT_RANKS) == [2**i for i in range(11)]
    assert parse_ranks("8, 2,2,1") == [1, 2, 8]


@pytest.mark.parametrize("text", ["0", "1,-2", "a", ","])
def test_bad_ranks_are_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_ranks(text)


@pytest.mark.parametrize("policy", ["fixed", "proportional", "rslora"])
def test_alpha_policies(policy: str) -> None:
    plan = plan_sweep(_recipe(), SweepConfig(alpha_policy=policy), DIMS)
    scales = {p.rank: lora_scale(p.alpha, p.rank, p.use_rslora) for p in plan.points}
    if policy == "fixed":
        assert all(p.alpha == 32 and not p.use_rslora for p in plan.points)
        assert scales[1] == 32 and scales[1024] == pytest.approx(32 / 1024)
    elif policy == "proportional":  # every rank keeps the recipe's alpha / r = 8
        assert all(s == pytest.approx(8) for s in scales.values())
    else:
        assert all(p.use_rslora for p in plan.points)
        assert scales[16] == pytest.approx(32 / 4)


def test_over_complete_ranks_are_marked_per_module() -> None:
    plan = plan_sweep(_recipe(), SweepConfig(), DIMS)
    over = {p.rank: p.over_complete for p in plan.points}
    assert over[128] == [] and over[256] == ["v_proj"]
    assert over[512] == ["v_proj"] and over[1024] == ["q_proj", "v_proj"]


def test_points_carry_rank_seed_name_and_tag() -> None:
    plan = plan_sweep(_recipe(), SweepConfig(ranks=[2, 4], seeds=[0, 1]), DIMS)
    assert [(p.rank, p.seed) for p in plan.points] == [(2, 0), (4, 0), (2, 1), (4, 1)]
    assert len({p.name for p in plan.points}) == 4
    recipe = plan.points[1].recipe_for(_recipe(), plan.sweep_id)
    assert (recipe.method.r, recipe.train.seed, recipe.output.tag) == (4, 0, plan.sweep_id)


def test_sweep_id_is_stable_and_depends_on_the_plan() -> None:
    a = plan_sweep(_recipe(), SweepConfig(ranks=[1, 2]), DIMS).sweep_id
    assert a == plan_sweep(_recipe(), SweepConfig(ranks=[2, 1], mode="concurrent"), DIMS).sweep_id
    assert a != plan_sweep(_recipe(), SweepConfig(ranks=[1, 4]), DIMS).sweep_id


def test_sweep_id_survives_a_new_recipe_field_at_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """An upgrade that adds a recipe field (at its default) must not rename, and so restart, a running sweep."""
    from adapterhub_local.config import Recipe

    before = plan_sweep(_recipe(), SweepConfig(ranks=[1, 2]), DIMS).sweep_id
    plain = Recipe.to_dict

    def with_new_field(self: Recipe) -> dict[str, object]:
        values = plain(self)
        values["method"]["new_knob"] = "off"
        return values

    monkeypatch.setattr(Recipe, "to_dict", with_new_field)
    assert plan_sweep(_recipe(), SweepConfig(ranks=[1, 2]), DIMS).sweep_id == before
    changed = _recipe()
    changed.method.dropout = 0.3
    assert plan_sweep(changed, SweepConfig(ranks=[1, 2]), DIMS).sweep_id != before


def test_target_dims_read_linear_and_conv1d_shapes() -> None:
    shapes = {"model.layers.0.self_attn.v_proj.weight": (192, 576),
              "model.layers.0.self_attn.q_proj.weight": (576, 576), "h.0.attn.c_attn.weight": (64, 192)}
    assert target_dims(shapes, ["q_proj", "v_proj"]) == DIMS
    assert target_dims(shapes, ["c_attn"], fan_in_fan_out=True) == {"c_attn": (64, 192)}


def test_data_fractions_cap_the_training_rows_and_keep_keys_apart() -> None:
    from adapterhub_local.sweep.plan import parse_fractions

    recipe = _recipe()
    config = SweepConfig(ranks=[1, 4], data_fractions=parse_fractions("0.1,0.3,1.0"))
    plan = plan_sweep(recipe, config, {}, train_rows=1000)
    assert len(plan.points) == 6 and len({p.key for p in plan.points}) == 6 and len({p.name for p in plan.points}) == 6
    caps = {p.fraction: p.train_examples for p in plan.points}
    assert caps == {0.1: 100, 0.3: 300, 1.0: None}
    small = next(p for p in plan.points if p.fraction == 0.1)
    assert small.recipe_for(recipe, plan.sweep_id).data.max_train_examples == 100
    # The whole-data sweep keeps its old keys and names, so sweeps started before fractions existed resume.
    whole = plan_sweep(recipe, SweepConfig(ranks=[1, 4]), {})
    assert all("-f" not in p.key and "-f" not in p.name for p in whole.points)
    assert whole.sweep_id != plan.sweep_id
