"""Expert profiles and selections (layer 0): each rule on a hand-made profile, validation
errors that name the layer and expert, and JSON in our format and ESFT's."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import get_args

import pytest

from emmoe_dist.errors import EmmoeError, InputError
from emmoe_dist.experts import (
    RULE_NEEDS,
    ExpertProfile,
    ExpertSelection,
    LayerRouting,
    SelectionRule,
    missing_fields,
    select_experts,
)
from emmoe_dist.families import FAMILIES

QWEN = FAMILIES["qwen3_moe"]
# The tiny Qwen3 config as a plain dict: 3 layers, 8 experts, layer 1 dense.
QWEN_CONFIG = dict(QWEN.tiny)


def make_profile() -> ExpertProfile:
    """10 tokens, top-2, 4 experts; sums chosen so that every rule's answer is known by hand."""
    return ExpertProfile(
        model="hand-made",
        family="qwen3_moe",
        dataset="unit",
        dataset_hash="0" * 40,
        tokens=10,
        top_k=2,
        num_experts=4,
        include_prompt=False,
        layers=(
            # token share .4 .2 .2 .2 (a three-way tie); gate share .2 .3 .1 .4
            LayerRouting(layer=0, token_counts=(8, 4, 4, 4), gate_sums=(2.0, 3.0, 1.0, 4.0)),
            # token share 0 .5 .25 .25; gate share 0 .6 .2 .2
            LayerRouting(layer=2, token_counts=(0, 10, 5, 5), gate_sums=(0.0, 6.0, 2.0, 2.0)),
            # token share .7 .2 .1 0: in floats .7 + .2 = 0.8999999999999999 < .9
            LayerRouting(layer=3, token_counts=(14, 4, 2, 0), gate_sums=(7.0, 2.0, 1.0, 0.0)),
        ),
    )


def test_derived_statistics() -> None:
    profile = make_profile()
    layer0 = profile.layer(0)
    assert layer0.token_share == [0.4, 0.2, 0.2, 0.2]
    assert layer0.gate_share == [0.2, 0.3, 0.1, 0.4]
    assert layer0.mean_gate == [0.25, 0.75, 0.25, 1.0]
    assert profile.layer(2).mean_gate[0] == 0.0  # never chosen: 0, not a division error
    expected = -(0.4 * math.log(0.4) + 3 * 0.2 * math.log(0.2))
    assert layer0.entropy == pytest.approx(expected)
    uniform = LayerRouting(layer=0, token_counts=(5, 5, 5, 5), gate_sums=(1.0,) * 4)
    assert uniform.entropy == pytest.approx(math.log(4))
    with pytest.raises(EmmoeError, match="no MoE layer 1"):
        profile.layer(1)


def test_top_k_breaks_ties_by_lower_id() -> None:
    sel = ExpertSelection.top_k(make_profile(), 2)
    # layer 0: expert 0 (8), then 1/2/3 tie at 4 -> 1; layer 2: 1 (10), then 2/3 tie -> 2.
    assert dict(sel.experts) == {0: (0, 1), 2: (1, 2), 3: (0, 1)}
    assert (sel.family, sel.num_experts) == ("qwen3_moe", 4)
    assert ExpertSelection.top_k(make_profile(), 1).experts_for(2) == (1,)
    with pytest.raises(EmmoeError, match=r"k must be in 1\.\.4"):
        ExpertSelection.top_k(make_profile(), 5)


@pytest.mark.parametrize(
    ("score", "p", "expected"),
    [
        # smallest prefix with cumulative share >= p; reaching p exactly stops (layer 0, p .4)
        ("token", 0.4, {0: (0,), 2: (1,), 3: (0,)}),
        ("token", 0.5, {0: (0, 1), 2: (1,), 3: (0,)}),
        # .7 + .2 reaches .9 up to rounding: expert 2 is not added
        ("token", 0.9, {0: (0, 1, 2, 3), 2: (1, 2, 3), 3: (0, 1)}),
        ("gate", 0.5, {0: (1, 3), 2: (1,), 3: (0,)}),
        # layer 0: 3 (.4) + 1 (.3) reaches .7; layer 2: 1 (.6), then the .2/.2 tie goes to 2
        ("gate", 0.7, {0: (1, 3), 2: (1, 2), 3: (0,)}),
        ("gate", 1.0, {0: (0, 1, 2, 3), 2: (1, 2, 3), 3: (0, 1, 2)}),
    ],
)
def test_esft_rule(score: str, p: float, expected: dict[int, tuple[int, ...]]) -> None:
    sel = ExpertSelection.esft(make_profile(), score, p)  # type: ignore[arg-type]
    assert dict(sel.experts) == expected
    assert f"p={p}" in sel.rule and f"score={score}" in sel.rule


def test_esft_rejects_bad_p() -> None:
    with pytest.raises(EmmoeError, match="p must be in"):
        ExpertSelection.esft(make_profile(), "token", 0.0)


def test_all_and_single_skip_the_dense_layer() -> None:
    everything = ExpertSelection.all(QWEN, QWEN_CONFIG)
    assert dict(everything.experts) == {0: tuple(range(8)), 2: tuple(range(8))}
    assert everything.is_all
    everything.validate(QWEN, QWEN_CONFIG)
    single = ExpertSelection.single(4, QWEN, QWEN_CONFIG)
    assert dict(single.experts) == {0: (4,), 2: (4,)}
    assert not single.is_all
    assert single.layers == [0, 2]
    assert single.experts_for(1) == ()


@pytest.mark.parametrize(
    ("experts", "match", "field"),
    [
        ({0: [8]}, "layer 0: expert 8 is out of range 0..7", "experts.0"),
        ({2: [1, -1]}, "layer 2: expert -1 is out of range", "experts.2"),
        ({1: [0]}, "layer 1 is a dense layer", "experts.1"),
        ({7: [0]}, "layer 7 is beyond the last layer", "experts.7"),
        ({0: [1], 2: []}, "layer 2 lists no experts", "experts.2"),
        ({}, "the selection is empty", "experts"),
    ],
)
def test_invalid_selections_name_layer_and_expert(
    experts: dict[int, list[int]], match: str, field: str
) -> None:
    with pytest.raises(InputError, match=match) as info:
        ExpertSelection.explicit(experts, QWEN, QWEN_CONFIG)
    assert info.value.field == field


def test_single_out_of_range_and_family_mismatch() -> None:
    with pytest.raises(InputError, match="expert 9 is out of range"):
        ExpertSelection.single(9, QWEN, QWEN_CONFIG)
    mixtral = ExpertSelection.single(0, FAMILIES["mixtral"], dict(FAMILIES["mixtral"].tiny))
    with pytest.raises(InputError, match="family 'mixtral'") as info:
        mixtral.validate(QWEN, QWEN_CONFIG, file="sel.json")
    assert str(info.value).startswith("sel.json: family: ")


def test_duplicate_expert_is_an_error() -> None:
    with pytest.raises(EmmoeError, match="layer 0: expert 3 is listed twice"):
        ExpertSelection.explicit({0: [3, 1, 3]})


def test_selection_json_round_trip(tmp_path: Path) -> None:
    sel = ExpertSelection.esft(make_profile(), "gate", 0.7)
    path = sel.save(tmp_path / "sub" / "selection.json")
    data = json.loads(path.read_text())
    assert data["experts"] == {"0": [1, 3], "2": [1, 2], "3": [0]}
    assert data["family"] == "qwen3_moe" and data["schema_version"] == 1
    assert ExpertSelection.load(path) == sel
    assert [p.name for p in path.parent.iterdir()] == ["selection.json"]  # no temp file left


def test_esft_format_file_loads(tmp_path: Path) -> None:
    # As ESFT's generate_expert_config.py writes it: ids in score order, its own flags.
    path = tmp_path / "esft.json"
    path.write_text(
        '{"experts": {"2": [5, 1], "0": [3]}, "shared_experts": false, "non_expert_modules": false}'
    )
    sel = ExpertSelection.load(path)
    assert dict(sel.experts) == {0: (3,), 2: (1, 5)}
    assert (sel.family, sel.num_experts, sel.is_all) == (None, None, False)
    sel.validate(QWEN, QWEN_CONFIG)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"experts": {"0": ["a"]}}', ": experts.0: must be a list of expert ids"),
        ('{"experts": {"x": [1]}}', ": experts.x: layer keys must be non-negative"),
        ('{"experts": {"0": [1]}, "rules": "x"}', ": rules: unknown key"),
        ('{"experts": {"0": [1]}, "num_experts": 0}', ": num_experts: must be positive"),
        ('{"experts": [1]}', ": experts: must be an object"),
        ('{"experts": {"0": [1]},\n "rule": }', ":2: invalid JSON"),
    ],
)
def test_bad_selection_files_name_file_and_field(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(InputError) as info:
        ExpertSelection.load(path)
    assert str(info.value).startswith(str(path))
    assert expected in str(info.value)


def test_profile_json_round_trip(tmp_path: Path) -> None:
    profile = make_profile()
    path = profile.save(tmp_path / "profile.json")
    loaded = ExpertProfile.load(path)
    assert loaded == profile
    assert loaded.layer(3).token_counts == (14, 4, 2, 0)
    assert ExpertProfile.from_json(profile.to_json()) == profile


def test_bad_profile_files_name_file_and_field(tmp_path: Path) -> None:
    data = json.loads(make_profile().to_json())
    data["layers"][1]["token_counts"] = [0, 10, 5, "many"]
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError) as info:
        ExpertProfile.load(path)
    assert info.value.file == str(path)
    assert info.value.field == "layers.1.token_counts.3"

    data = json.loads(make_profile().to_json())
    data["tokens"] = 11  # counts no longer sum to tokens * top_k
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="layer 0: counts sum to 20, expected tokens"):
        ExpertProfile.load(path)

    with pytest.raises(InputError, match="profile file does not exist"):
        ExpertProfile.load(tmp_path / "missing.json")


def test_select_experts_is_every_rule_through_one_door(tmp_path: Path) -> None:
    profile = make_profile()
    path = profile.save(tmp_path / "profile.json")
    model = (QWEN, QWEN_CONFIG)
    assert select_experts("all", model=model) == ExpertSelection.all(QWEN, QWEN_CONFIG)
    assert select_experts("single", model=model, expert=4) == ExpertSelection.single(
        4, QWEN, QWEN_CONFIG
    )
    assert select_experts("top_k", profile=path, k=2) == ExpertSelection.top_k(profile, 2)
    assert select_experts("esft", profile=profile, score="gate", p=0.5) == ExpertSelection.esft(
        profile, "gate", 0.5
    )
    hand = select_experts("explicit", experts={0: [1, 2]}, model=model)
    assert dict(hand.experts) == {0: (1, 2)}
    saved = hand.save(tmp_path / "sel.json")
    assert select_experts("file", file=saved, model=model) == ExpertSelection.load(saved)


def test_select_experts_names_what_a_rule_needs(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="rule 'top_k' needs k, profile"):
        select_experts("top_k")
    with pytest.raises(InputError, match="rule 'single' needs model"):
        select_experts("single", expert=4)
    assert missing_fields("esft", {"p": 0.3}) == ["profile"]
    # the experiment's rule names and the table's are one list
    assert set(RULE_NEEDS) == set(get_args(SelectionRule))
    # checked against the model, a profile's selection names the profile file and line
    path = make_profile().save(tmp_path / "profile.json")
    with pytest.raises(InputError, match=r"profile\.json:\d+: family: selection is for family"):
        mixtral = FAMILIES["mixtral"]
        select_experts("top_k", profile=path, k=1, model=(mixtral, dict(mixtral.tiny)))
