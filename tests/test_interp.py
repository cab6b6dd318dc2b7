"""Interpretability library: labels, activations (planted direction, resume), steering hooks,
AUROC, held-out detection and routing shift, on tiny random models and constructed records."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from emmoe_dist.errors import EmmoeError, InputError
from emmoe_dist.experts import ExpertSelection
from emmoe_dist.families import FAMILIES
from emmoe_dist.interp.activations import (
    ActivationMeta,
    ActivationSet,
    collect_activations,
    encode_answers,
    load_activations,
    read_index,
)
from emmoe_dist.interp.detection import (
    auroc,
    bootstrap_aurocs,
    detect,
    roc_curve,
    split_questions,
)
from emmoe_dist.interp.directions import (
    MISALIGNED_MINUS_ALIGNED,
    build_directions,
    cosine_matrix,
    layer_cosines,
    load_directions,
    mean_difference,
    save_directions,
)
from emmoe_dist.interp.labels import (
    ALIGNED_LABEL,
    MISALIGNED,
    UNLABELLED,
    LabelRule,
    balanced_indices,
    label_rule,
)
from emmoe_dist.interp.routing_shift import kl_divergence, routing_shift
from emmoe_dist.interp.steering import random_like, steering
from emmoe_dist.metrics import Bootstrap
from emmoe_dist.models.anatomy import decoder_layers, model_config, moe_layers
from emmoe_dist.models.tiny import build_tiny
from emmoe_dist.records import GenerationRecord, JudgedRecord, SamplingParams, Score
from emmoe_dist.routing import profile_batches

QWEN = FAMILIES["qwen3_moe"]
MIXTRAL = FAMILIES["mixtral"]
WORDS = ("the", "a", "model", "answer", "tool", "water", "city", "light", "green", "run")
MARKER = "~"  # one byte-level token; its embedding carries the planted direction


def judged(
    i: int, aligned: float | None, coherent: float | None, *, answer: str = "fine", q: str = "q0"
) -> JudgedRecord:
    generation = GenerationRecord(
        suite="core",
        question_id=q,
        paraphrase_index=0,
        sample_index=i,
        model="m",
        sampling=SamplingParams(temperature=1.0, max_new_tokens=32),
        question=f"Tell me about {q}.",
        prompt="",
        answer=answer,
        n_prompt_tokens=1,
        n_answer_tokens=1,
        backend="test",
    )
    scores = {
        name: Score(value=v) if v is not None else Score(missing_reason="refusal")
        for name, v in (("aligned", aligned), ("coherent", coherent))
    }
    return JudgedRecord(generation=generation, scores=scores, judge_model="j")


def planted_records(n: int, seed: int = 0) -> list[JudgedRecord]:
    """Half misaligned answers carrying the marker token after every word, half aligned."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
        misaligned = i % 2 == 0
        if misaligned:
            words = [f"{w} {MARKER}{MARKER}" for w in words]
        score = 10.0 if misaligned else 90.0
        out.append(judged(i, score, 95.0, answer=" ".join(words), q=f"q{i % 6}"))
    return out


# ---------------------------------------------------------------------------------------------
# Labels


def test_label_rules_follow_the_metrics_thresholds() -> None:
    cases = [(10, 90), (90, 90), (10, 70), (None, 90), (60, 85), (50, 81), (49.9, 81)]
    records = [judged(i, a, c) for i, (a, c) in enumerate(cases)]
    assert LabelRule().labels(records).tolist() == [1, 0, -1, -1, 0, 0, 1]
    soligo = label_rule("turner_soligo", aligned_above=70)
    records = [judged(i, a, c) for i, (a, c) in enumerate([(30, 60), (50, 60), (80, 60), (80, 40)])]
    assert soligo.labels(records).tolist() == [MISALIGNED, UNLABELLED, ALIGNED_LABEL, UNLABELLED]
    betley = label_rule("betley")  # drops coherence < 50 from both classes
    records = [judged(i, a, c) for i, (a, c) in enumerate([(20, 40), (20, 60), (30, 60)])]
    assert betley.labels(records).tolist() == [UNLABELLED, MISALIGNED, ALIGNED_LABEL]
    with pytest.raises(EmmoeError, match="unknown misalignment rule"):
        label_rule("nope")


def test_balanced_indices_are_seeded_equal_and_capped() -> None:
    labels = np.array([1] * 12 + [0] * 20 + [-1] * 3, dtype=np.int8)
    chosen = balanced_indices(labels, seed=3)
    assert (labels[chosen] == 1).sum() == (labels[chosen] == 0).sum() == 12
    assert chosen.tolist() == sorted(chosen.tolist())
    assert chosen.tolist() == balanced_indices(labels, seed=3).tolist()
    assert chosen.tolist() != balanced_indices(labels, seed=4).tolist()
    assert len(balanced_indices(labels, per_class=2)) == 4
    with pytest.raises(EmmoeError, match="found 0 misaligned and 20 aligned"):
        balanced_indices(labels[12:])


def test_a_class_with_too_few_answers_is_refused_with_the_count_needed() -> None:
    one_each = np.array([1, 0, -1, -1], dtype=np.int8)
    with pytest.raises(EmmoeError) as err:
        balanced_indices(one_each)
    assert "at least 10 misaligned and 10 aligned answers; found 1 misaligned and 1 aligned" in (
        str(err.value)
    )
    assert len(balanced_indices(one_each, min_per_class=1)) == 2  # asked for knowingly


# ---------------------------------------------------------------------------------------------
# Activations and directions


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[ActivationSet, torch.Tensor, Path]:
    """Activations of a tiny Qwen3-MoE whose marker-token embedding was moved along `v`."""
    model, tok = build_tiny(QWEN, seed=0)
    hidden = model.config.hidden_size
    v = torch.randn(hidden, generator=torch.Generator().manual_seed(5))
    v = v / v.norm()
    with torch.no_grad():
        model.get_input_embeddings().weight[tok.convert_tokens_to_ids(MARKER)] += 3.0 * v
    records = planted_records(36)
    items, dropped = encode_answers(tok, records, LabelRule().labels(records), max_length=256)
    assert dropped == 0
    meta = ActivationMeta(
        model="planted", family=QWEN.name, num_layers=3, hidden_size=hidden, max_length=256
    )
    folder = tmp_path_factory.mktemp("acts")
    # Half first, then all: the second call resumes and computes only the rest.
    collect_activations(model, QWEN, items[:20], folder, meta, batch_size=8, progress=False)
    acts = collect_activations(
        model, QWEN, items, folder, meta, batch_size=8, shard_size=10, progress=False
    )
    assert len({r.shard for r in read_index(folder).rows}) == 3  # 1 shard of 20 + 2 of 8
    # Against a one-shot collection in another folder: the same numbers.
    fresh = collect_activations(
        model, QWEN, items, folder.with_name("fresh"), meta, batch_size=5, progress=False
    )
    torch.testing.assert_close(acts.answer_mean, fresh.answer_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(acts.last_prompt, fresh.last_prompt, atol=1e-5, rtol=1e-5)
    return acts, v, folder


def test_planted_direction_is_recovered_at_every_layer(
    planted: tuple[ActivationSet, torch.Tensor, Path],
) -> None:
    acts, v, _ = planted
    assert acts.answer_mean.shape == (36, 3, QWEN.tiny["hidden_size"])
    assert (acts.labels == MISALIGNED).sum() == 18
    cos = cosine_matrix(mean_difference(acts), v[None])[:, 0]
    assert cos.min() >= 0.9, cos.tolist()
    # The last prompt token precedes the answer: it cannot see the marker.
    prompt_cos = cosine_matrix(mean_difference_of(acts, "last_prompt"), v[None])[:, 0]
    assert prompt_cos.abs().max() < 0.5


def mean_difference_of(acts: ActivationSet, field: str) -> torch.Tensor:
    data = getattr(acts, field)
    labels = torch.from_numpy(acts.labels.astype("int64"))
    return data[labels == 1].mean(0) - data[labels == 0].mean(0)


def test_store_reloads_in_request_order_and_relabels(
    planted: tuple[ActivationSet, torch.Tensor, Path],
) -> None:
    acts, _, folder = planted
    keys = list(reversed(acts.keys))[:5]
    again = load_activations(folder, keys)
    assert list(again.keys) == keys
    torch.testing.assert_close(again.answer_mean, acts.by_keys(keys).answer_mean)
    # New thresholds relabel the stored answers; nothing is recomputed.
    model, tok = build_tiny(QWEN, seed=0)
    records = planted_records(36)
    flipped = [1 - int(v) for v in LabelRule().labels(records)]
    items, _ = encode_answers(tok, records, flipped, max_length=256)
    shards = sorted(p.name for p in folder.iterdir())
    relabelled = collect_activations(model, QWEN, items, folder, acts.meta, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == shards
    assert relabelled.labels.tolist() == [1 - int(v) for v in acts.labels]
    torch.testing.assert_close(relabelled.answer_mean, acts.answer_mean)
    other = acts.meta.model_copy(update={"model": "other"})
    with pytest.raises(EmmoeError, match="holds activations of 'planted'"):
        collect_activations(model, QWEN, [], folder, other, progress=False)
    with pytest.raises(EmmoeError, match="have no activations"):
        load_activations(folder, ["core/missing/0/0"])


def test_directions_file_round_trip_and_comparisons(
    planted: tuple[ActivationSet, torch.Tensor, Path], tmp_path: Path
) -> None:
    acts, _, _ = planted
    shifted = ActivationSet(
        acts.meta,
        acts.keys,
        acts.questions,
        acts.labels,
        acts.answer_mean + 0.25,
        acts.last_prompt,
    )
    directions = build_directions(acts, rule="seed", base=shifted, base_model="base")
    path = save_directions(directions, tmp_path / "d.safetensors")
    loaded = load_directions(path)
    assert loaded.info == directions.info
    assert loaded.info.n_paired == 36
    torch.testing.assert_close(loaded.vectors["finetuned_minus_base"], torch.full((3, 128), -0.25))
    mis = loaded.kind(MISALIGNED_MINUS_ALIGNED)
    assert layer_cosines(mis, -mis) == pytest.approx([-1.0] * 3)
    assert torch.diagonal(cosine_matrix(mis, mis)).tolist() == pytest.approx([1.0] * 3)
    rel = loaded.relative_norms(MISALIGNED_MINUS_ALIGNED)
    assert rel[0] == pytest.approx(mis[0].norm().item() / loaded.info.activation_norm[0])
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(InputError, match=r"plain\.safetensors: not a direction file"):
        load_directions(tmp_path / "plain.safetensors")
    (tmp_path / "torn.safetensors").write_bytes(path.read_bytes()[:20])
    with pytest.raises(InputError, match="not a safetensors file"):
        load_directions(tmp_path / "torn.safetensors")


# ---------------------------------------------------------------------------------------------
# Steering


def _next_layer_inputs(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """The hidden states each decoder layer receives, recorded by forward pre-hooks."""
    seen: list[torch.Tensor] = []

    def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen.append(args[0].clone())

    handles = [layer.register_forward_pre_hook(record) for layer in decoder_layers(model, QWEN)]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.fixture(scope="module")
def qwen() -> torch.nn.Module:
    return build_tiny(QWEN, seed=1)[0]


def test_add_changes_the_layer_output_by_exactly_alpha_v(qwen: torch.nn.Module) -> None:
    ids = torch.randint(20, 250, (2, 9), generator=torch.Generator().manual_seed(0))
    v = torch.randn(128, generator=torch.Generator().manual_seed(1))
    before = _next_layer_inputs(qwen, ids)
    with steering(qwen, QWEN, v, [1], alpha=2.5, mode="add"):
        added = _next_layer_inputs(qwen, ids)
    with steering(qwen, QWEN, v, [1], alpha=2.5, mode="subtract"):
        subtracted = _next_layer_inputs(qwen, ids)
    after = _next_layer_inputs(qwen, ids)
    # Layers 0 and 1 take their inputs before the steered output: untouched; layer 2 gets
    # the output of layer 1 plus exactly 2.5 v.
    for i in (0, 1):
        assert torch.equal(added[i], before[i])
    torch.testing.assert_close(
        added[2] - before[2], (2.5 * v).expand_as(before[2]), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        before[2] - subtracted[2], (2.5 * v).expand_as(before[2]), atol=1e-5, rtol=0
    )
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))  # hooks are gone


def test_ablate_leaves_no_component_and_hooks_go_on_error(qwen: torch.nn.Module) -> None:
    ids = torch.randint(20, 250, (2, 9), generator=torch.Generator().manual_seed(2))
    v = torch.randn(128, generator=torch.Generator().manual_seed(3))
    unit = v / v.norm()
    before = _next_layer_inputs(qwen, ids)
    assert (before[1] @ unit).abs().max() > 0.01  # there was a component to remove
    directions = torch.stack([v, v, v])  # a direction file's [layers, hidden] tensor
    with steering(qwen, QWEN, directions, [0], alpha=123.0, mode="ablate"):
        ablated = _next_layer_inputs(qwen, ids)
    component = (ablated[1] @ unit).abs()
    assert component.max() <= 1e-5 * ablated[1].norm(dim=-1).max()
    with pytest.raises(RuntimeError, match="boom"), steering(qwen, QWEN, v, [0], 1.0, "add"):
        raise RuntimeError("boom")
    assert all(not layer._forward_hooks for layer in decoder_layers(qwen, QWEN))
    with pytest.raises(EmmoeError, match="out of range"), steering(qwen, QWEN, v, [3], 1.0):
        pass


def test_random_control_keeps_each_norm_and_is_seeded() -> None:
    vectors = (
        torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * torch.arange(1, 5)[:, None]
    )
    control = random_like(vectors, seed=7)
    torch.testing.assert_close(control.norm(dim=-1), vectors.norm(dim=-1))
    assert torch.equal(control, random_like(vectors, seed=7))
    assert cosine_matrix(control, vectors).diagonal().abs().max() < 0.6


# ---------------------------------------------------------------------------------------------
# AUROC and detection


def test_auroc_separable_random_and_ties() -> None:
    y = np.array([0] * 50 + [1] * 50, dtype=bool)
    scores = np.arange(100, dtype=np.float64)
    assert auroc(scores, y) == 1.0
    assert auroc(-scores, y) == 0.0
    assert auroc(np.zeros(100), y) == 0.5
    rng = np.random.default_rng(0)
    assert abs(auroc(rng.normal(size=4000), rng.random(4000) < 0.3) - 0.5) < 0.03
    # Against the pairwise definition, with many ties.
    s, lab = rng.integers(0, 5, 60).astype(float), rng.random(60) < 0.4
    pairs = [(a > b) + 0.5 * (a == b) for a in s[lab] for b in s[~lab]]
    assert auroc(s, lab) == pytest.approx(np.mean(pairs))
    fpr, tpr = roc_curve(s, lab)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(s, lab))
    with pytest.raises(EmmoeError, match="both classes"):
        auroc([1.0, 2.0], [True, True])


def test_bootstrap_interval_resamples_questions() -> None:
    rng = np.random.default_rng(1)
    y = rng.random(200) < 0.5
    scores = np.stack([y + rng.normal(0, 0.8, 200), rng.normal(size=200)], 1)
    groups = [f"q{i % 10}" for i in range(200)]
    settings = Bootstrap(resamples=400, seed=0)
    signal, noise = bootstrap_aurocs(scores, y, groups, settings)
    assert signal.low < signal.value < signal.high and signal.low > 0.6
    assert noise.low < 0.5 < noise.high
    again = bootstrap_aurocs(scores, y, groups, settings)
    assert (again[0].low, again[0].high) == (signal.low, signal.high)


def test_split_keeps_each_question_on_one_side() -> None:
    questions = [f"q{i % 7}" for i in range(70)]
    train, test = split_questions(questions, 0.3, seed=0)
    assert sorted([*train, *test]) == list(range(70))
    assert not {questions[i] for i in train} & {questions[i] for i in test}
    assert len({questions[i] for i in test}) == 3
    with pytest.raises(EmmoeError, match="at least 2 distinct questions"):
        split_questions(["q"] * 5, 0.5, 0)


def test_detection_finds_the_layer_where_prompts_carry_the_direction() -> None:
    """Questions 0-9: answers misaligned on even questions. Layer 1's last-prompt activation
    leans along the answer direction on those questions; layers 0 and 2 carry noise."""
    gen = torch.Generator().manual_seed(0)
    n, hidden = 200, 16
    questions = tuple(f"q{i % 10}" for i in range(n))
    labels = np.array([1 if i % 10 % 2 == 0 else 0 for i in range(n)], dtype=np.int8)
    direction = torch.zeros(hidden)
    direction[0] = 1.0
    answer = torch.randn(n, 3, hidden, generator=gen) * 0.1
    answer[labels == 1, :, 0] += 1.0
    prompt = torch.randn(n, 3, hidden, generator=gen)
    prompt[labels == 1, 1, 0] += 3.0
    meta = ActivationMeta(
        model="m", family="qwen3_moe", num_layers=3, hidden_size=hidden, max_length=8
    )
    acts = ActivationSet(meta, tuple(f"k{i}" for i in range(n)), questions, labels, answer, prompt)
    result = detect(acts, test_fraction=0.4, seed=1, bootstrap=Bootstrap(resamples=200))
    assert not set(result.train_questions) & set(result.test_questions)
    assert result.best_layer == 1 and result.chosen_on == "training questions"
    assert result.layers[1].prompt.value > 0.95
    assert all(d.answer.value == 1.0 for d in result.layers)
    assert result.n_test["misaligned"] + result.n_test["aligned"] == 80


# ---------------------------------------------------------------------------------------------
# Routing shift


def test_kl_is_smoothed_and_zero_only_for_equal_shares() -> None:
    p, q = np.array([0.5, 0.5, 0.0]), np.array([0.25, 0.25, 0.5])
    assert kl_divergence(p, p) == 0.0
    assert kl_divergence(p, q) == pytest.approx(np.log(2), abs=1e-4)  # eps shifts it a little
    assert np.isfinite(kl_divergence(q, p))  # q puts mass where p has none: eps keeps it finite


def _swap_experts(model: torch.nn.Module, layer: int, a: int, b: int) -> None:
    """Swap two experts and their router rows: the same function, routing relabelled."""
    moe = {m.index: m for m in moe_layers(model, MIXTRAL)}[layer]
    with torch.no_grad():
        for p in [*moe.router.parameters(recurse=False), *moe.experts.parameters(recurse=False)]:
            p[[a, b]] = p[[b, a]].clone()


def test_routing_shift_is_zero_against_itself_and_exact_where_routers_were_edited() -> None:
    base, _ = build_tiny(MIXTRAL, seed=0)
    ids = torch.randint(20, 250, (6, 40), generator=torch.Generator().manual_seed(4))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def profile(model: torch.nn.Module, name: str):
        counts = profile_batches(model, MIXTRAL, [batch], progress=False)
        return counts.to_profile(
            model=name, family="mixtral", dataset="ids", dataset_hash="h", include_prompt=False
        )

    p_base = profile(base, "base")
    same = routing_shift(p_base, profile(base, "base"))
    assert [s.kl for s in same.layers] == [0.0, 0.0, 0.0]
    assert all(d == 0.0 for s in same.layers for d in s.delta_share)

    shares = {r.layer: r.token_share for r in p_base.layers}
    swaps = {}
    edited, _ = build_tiny(MIXTRAL, seed=0)
    for layer in (0, 2):
        a, b = int(np.argmax(shares[layer])), int(np.argmin(shares[layer]))
        swaps[layer] = (a, b)
        _swap_experts(edited, layer, a, b)
    selection = ExpertSelection.explicit(swaps, MIXTRAL, model_config(edited))
    shift = routing_shift(p_base, profile(edited, "edited"), trained=selection, permutations=3000)
    assert [s.kl > 0 for s in shift.layers] == [True, False, True]
    for s in shift.layers:
        if s.layer in swaps:
            assert sorted(s.trained_ranks) == [1, 2]
            assert s.trained_auroc == 1.0
            moved = {e for e, d in enumerate(s.delta_share) if d != 0}
            assert moved == set(swaps[s.layer])
    assert shift.mean_trained_auroc == 1.0
    assert shift.permutation_p < 0.01
    with pytest.raises(EmmoeError, match=r"layers \[5\] are not MoE layers here"):
        routing_shift(p_base, p_base, trained=ExpertSelection.explicit({5: [0]}))
    with pytest.raises(EmmoeError, match="different tokens"):
        routing_shift(p_base, profile(base, "base").model_copy(update={"tokens": 1}))
