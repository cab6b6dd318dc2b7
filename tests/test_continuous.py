"""The continuous transformers engine against transformers' `generate` path, and steering on it.

Every family answers greedily and with seeded sampling exactly as on the `generate` path, with
slots refilled mid-run and a prompt longer than GPT-oss's sliding window; a seed re-draws its
answer alone or in another order; stop rules hold; per-row steering changes each row's layer
output by exactly its condition's vector, only at the stated layer, in prefills and decode
steps; one pass over all conditions gives the answers of one pass per condition; the GPU
benchmark runs at a tiny shape.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from emmoe_dist.config import load_config
from emmoe_dist.errors import EmmoeError
from emmoe_dist.families import FAMILIES
from emmoe_dist.generate.backends import transformers_generator
from emmoe_dist.generate.continuous import ContinuousGenerator
from emmoe_dist.generate.interface import RawSample, SampleRequest, SamplingOptions
from emmoe_dist.generate.sources import resolve_source
from emmoe_dist.generate.transformers_backend import TransformersGenerator
from emmoe_dist.interp.steering import RowSteering, SteerCondition, steering
from emmoe_dist.models.anatomy import decoder_layers
from emmoe_dist.models.hooks import ForwardHooks, graph_safe, hooks_replay_safely
from emmoe_dist.models.tiny import build_tiny

QWEN = FAMILIES["qwen3_moe"]


def _requests(seed: int = 0) -> list[SampleRequest]:
    """Prompts of 5 to 70 tokens (GPT-oss's tiny sliding window is 64), one prompt twice."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(20, 250, (n,), generator=g).tolist() for n in (9, 70, 5)]
    requests = [
        SampleRequest(key=f"r{i}", prompt_ids=tuple(p), seed=10 + i) for i, p in enumerate(prompts)
    ]
    return [*requests, SampleRequest(key="again", prompt_ids=requests[0].prompt_ids, seed=99)]


def _answers(gen: Any, requests: list[SampleRequest], options: SamplingOptions) -> dict[str, Any]:
    return {s.key: s for batch in gen.generate(requests, options) for s in batch}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_answers_as_on_the_generate_path(family: str) -> None:
    model, tok = build_tiny(family, seed=0)
    requests = _requests()
    for options in (
        SamplingOptions(temperature=0.0, max_new_tokens=12),
        SamplingOptions(temperature=1.0, top_p=0.9, max_new_tokens=12),
    ):
        before = _answers(TransformersGenerator(model, tok, batch_size=4), requests, options)
        # 2 slots for 4 samples: slots are refilled as samples finish
        after = _answers(ContinuousGenerator(model, tok, batch_size=2), requests, options)
        assert after == before, (family, options.temperature)
    assert model.config._attn_implementation != "emmoe_slots"  # restored after generating


def test_a_seed_redraws_its_answer_alone_in_any_slot_and_order() -> None:
    model, tok = build_tiny(QWEN, seed=0)
    requests = _requests(seed=1)
    options = SamplingOptions(temperature=1.0, max_new_tokens=10, top_logprobs=3)
    together = _answers(ContinuousGenerator(model, tok, batch_size=3), requests, options)
    assert together["r0"].token_ids != together["again"].token_ids  # same prompt, other seed
    reordered = _answers(ContinuousGenerator(model, tok, batch_size=2), requests[::-1], options)
    alone = ContinuousGenerator(model, tok, batch_size=1)
    for r in requests:
        (again,) = next(iter(alone.generate([r], options)))
        assert again.token_ids == together[r.key].token_ids == reordered[r.key].token_ids
        assert again.stopped == together[r.key].stopped
        # log-probabilities agree up to float rounding between batch shapes
        assert again.top_logprobs is not None and together[r.key].top_logprobs is not None
        for mine, theirs in zip(again.top_logprobs, together[r.key].top_logprobs, strict=True):
            assert [t for t, _ in mine] == [t for t, _ in theirs]
            assert max(abs(a - b) for (_, a), (_, b) in zip(mine, theirs, strict=True)) < 1e-4
    sample = together["r1"]
    assert sample.top_logprobs is not None and len(sample.top_logprobs) == len(sample.token_ids)
    values = [lp for _, lp in sample.top_logprobs[0]]
    assert len(values) == 3 and values == sorted(values, reverse=True) and values[0] <= 0


def test_stop_tokens_end_a_sample_unless_min_new_tokens_holds_them() -> None:
    model, tok = build_tiny(QWEN, seed=0)
    gen = ContinuousGenerator(model, tok, batch_size=2)
    request = [SampleRequest(key="k", prompt_ids=(3, 40, 41), seed=1)]
    greedy = SamplingOptions(temperature=0.0, max_new_tokens=8)
    (first,) = next(iter(gen.generate(request, greedy)))
    assert not first.stopped and len(first.token_ids) == 8
    ids = first.token_ids
    cut = next(j for j in range(1, len(ids)) if ids[j] not in ids[:j])
    gen.stop_ids = frozenset({ids[cut]})  # a later greedy token now stops the sample
    (early,) = next(iter(gen.generate(request, greedy)))
    assert early == RawSample(key="k", token_ids=ids[:cut], stopped=True)
    fixed = SamplingOptions(temperature=0.0, max_new_tokens=8, min_new_tokens=8)
    (full,) = next(iter(gen.generate(request, fixed)))
    assert not full.stopped and len(full.token_ids) == 8
    with pytest.raises(EmmoeError, match="per-request adapters"):
        next(
            iter(
                gen.generate([SampleRequest(key="a", prompt_ids=(3,), seed=0, adapter="x")], greedy)
            )
        )
    with pytest.raises(EmmoeError, match="steering condition 1"):
        next(
            iter(
                gen.generate([SampleRequest(key="a", prompt_ids=(3,), seed=0, condition=1)], greedy)
            )
        )


class _Outputs(ForwardHooks):
    """Each decoder layer's output, per forward: registered before and after the steering
    hooks, it sees the layer's own output and the steered one."""

    def __init__(self, layers: list[torch.nn.Module]) -> None:
        self.seen: list[list[torch.Tensor]] = [[] for _ in layers]
        super().__init__((layer, self._record(i)) for i, layer in enumerate(layers))

    def _record(self, i: int) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            self.seen[i].append(output.detach().clone())

        return hook


def test_row_steering_on_the_fast_path_adds_each_rows_vector_at_its_layer_only() -> None:
    model, tok = build_tiny(QWEN, seed=1)
    layers = decoder_layers(model, QWEN)
    v = torch.randn(128, generator=torch.Generator().manual_seed(3))
    conditions = [
        None,
        SteerCondition(v, 2.5, "add"),
        SteerCondition(v, 1.5, "subtract"),
        SteerCondition(v, 9.0, "ablate"),
    ]
    prompt = _requests()[0].prompt_ids
    requests = [
        SampleRequest(key=f"c{c}", prompt_ids=prompt, seed=5, condition=c) for c in range(4)
    ]
    options = SamplingOptions(temperature=1.0, max_new_tokens=6, min_new_tokens=6)
    raw, steered = _Outputs(layers), _Outputs(layers)
    conditions_seen: list[torch.Tensor] = []
    with raw, RowSteering(model, QWEN, conditions, [1]) as rows, steered:
        gen = ContinuousGenerator(model, tok, batch_size=3, steering=rows)
        rows_hook = graph_safe(
            lambda m, a, o: conditions_seen.append(rows.rows[: o.shape[0]].clone())  # type: ignore[index]
        )
        with ForwardHooks([(layers[1], rows_hook)]):
            answers = _answers(gen, requests, options)
    assert answers["c1"].token_ids != answers["c0"].token_ids  # the steering mattered
    forwards = len(conditions_seen)
    # one prefill per condition; 3 slots decode 5 steps, then the fourth sample 5 more
    assert forwards == 4 + 5 + 5
    unit = v / v.norm()
    for f in range(forwards):
        before, after = raw.seen[1][f], steered.seen[1][f]
        for row, c in enumerate(conditions_seen[f].tolist()):
            change = after[row] - before[row]
            if c == 0:
                assert torch.equal(change, torch.zeros_like(change))
            elif c in (1, 2):
                sign = 2.5 if c == 1 else -1.5
                torch.testing.assert_close(change, (sign * v).expand_as(change), atol=1e-5, rtol=0)
            else:
                assert (after[row] @ unit).abs().max() < 1e-4
                assert (before[row] @ unit).abs().max() > 1e-2
        for other in (0, 2):  # other layers keep their own output
            assert torch.equal(raw.seen[other][f], steered.seen[other][f])
    assert not any(layer._forward_hooks for layer in layers)  # all hooks removed


def test_all_conditions_in_one_pass_give_one_pass_per_condition_answers() -> None:
    model, tok = build_tiny(QWEN, seed=1)
    v = torch.randn(128, generator=torch.Generator().manual_seed(4)) * 3
    control = torch.randn(128, generator=torch.Generator().manual_seed(5)) * 3
    per_condition = [(None, 0.0), (v, 2.0), (control, 2.0), (v, -1.0)]
    requests = _requests(seed=2)
    options = SamplingOptions(temperature=1.0, max_new_tokens=10)
    before = []
    for vector, alpha in per_condition:
        gen = TransformersGenerator(model, tok, batch_size=4)
        if vector is None:
            before.append(_answers(gen, requests, options))
            continue
        with steering(model, QWEN, vector, [1], alpha):
            before.append(_answers(gen, requests, options))
    conditions = [None if v_ is None else SteerCondition(v_, a) for v_, a in per_condition]
    tagged = [
        SampleRequest(key=f"{c}/{r.key}", prompt_ids=r.prompt_ids, seed=r.seed, condition=c)
        for c in range(len(conditions))
        for r in requests
    ]
    with RowSteering(model, QWEN, conditions, [1]) as rows:
        one_pass = _answers(
            ContinuousGenerator(model, tok, batch_size=5, steering=rows), tagged, options
        )
    for c, answers in enumerate(before):
        for key, sample in answers.items():
            assert one_pass[f"{c}/{key}"].token_ids == sample.token_ids
    assert before[0] != before[1]


def test_only_graph_safe_hooks_allow_cuda_graphs_and_taps_see_every_forward(
    tmp_path: Path,
) -> None:
    model, tok = build_tiny(QWEN, seed=0)
    layer = decoder_layers(model, QWEN)[0]
    shapes: list[tuple[int, ...]] = []
    assert hooks_replay_safely(model)
    with ForwardHooks([(layer, lambda m, a, o: shapes.append(tuple(o.shape[:2])))]):
        assert not hooks_replay_safely(model)
        requests = [SampleRequest(key=k, prompt_ids=(3, 40, 41, 42), seed=1) for k in "ab"]
        options = SamplingOptions(temperature=1.0, max_new_tokens=4, min_new_tokens=4)
        next(iter(ContinuousGenerator(model, tok, batch_size=8).generate(requests, options)))
    # the prompt once for both samples, then 2 slots per step (no more slots than samples)
    assert shapes == [(1, 4), (2, 1), (2, 1), (2, 1)]
    with ForwardHooks([(layer, graph_safe(lambda m, a, o: None))]):
        assert hooks_replay_safely(model)
    cfg = load_config(None, ["model.name_or_path=tiny:qwen3_moe"])
    source = resolve_source(cfg)
    assert isinstance(transformers_generator(cfg, source, "cpu"), ContinuousGenerator)
    cfg = load_config(
        None, ["model.name_or_path=tiny:qwen3_moe", "eval.transformers_engine=generate"]
    )
    assert isinstance(transformers_generator(cfg, source, "cpu"), TransformersGenerator)


def test_the_gpu_benchmark_runs_at_a_tiny_shape_on_cpu(tmp_path: Path, data_dir: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "speed.json"
    argv = [
        sys.executable, str(repo / "benchmarks" / "generate_speed.py"), "--shape", "tiny",
        "--data-dir", str(data_dir), "--batches", "2", "--new-tokens", "4",
        "--steer-answers", "2", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "BENCH_DEVICE": "cpu", "PYTHONPATH": str(repo)}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert {"device", "date", "command", "roofline_tok_s", "runs"} <= set(result)
    assert [(r["path"], r["batch"]) for r in result["runs"]] == [("before", 2), ("after", 2)]
    assert all(r["tok_s"] > 0 and 0 < r["roofline_fraction"] < 1 for r in result["runs"])
    assert result["steering"]["conditions"] == 2 and result["steering"]["speedup"] > 0
