"""Generation with the transformers backend on saved tiny models, and the vLLM adapter export.

Records, adapters, prompts and resuming go through the default (continuous) engine; seeds, the
KV cache and min_new_tokens are checked on the `generate` engine here and on the continuous
one in test_continuous.py.

Seeds: n samples per prompt differ, a seed re-draws its answer in any batch; an adapter
changes the answers; system prompt, chat template and thinking switch reach the prompt;
records are complete; a run killed midway and re-run writes every record exactly once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from emmoe_dist.adapters.lora import (
    adapter_state_dict,
    apply_lora,
    expert_factors,
    lora_config,
    save_peft_adapter,
)
from emmoe_dist.config import AdapterConfig, ExperimentConfig, ModelConfig, load_config
from emmoe_dist.errors import EmmoeError
from emmoe_dist.experts import ExpertSelection
from emmoe_dist.families import FAMILIES
from emmoe_dist.files import read_jsonl
from emmoe_dist.generate.continuous import ContinuousGenerator
from emmoe_dist.generate.interface import RawSample, SampleRequest, SamplingOptions
from emmoe_dist.generate.prompts import decode_sample, render_prompt
from emmoe_dist.generate.runner import SuiteSet, load_suites, run_generation
from emmoe_dist.generate.seeded_sampling import draw_tokens, seeded_uniform
from emmoe_dist.generate.sources import (
    ModelSource,
    from_run,
    load_for_generation,
    resolve_source,
)
from emmoe_dist.generate.transformers_backend import TransformersGenerator
from emmoe_dist.generate.vllm_export import (
    checkpoint_expert_names,
    export_per_expert_lora,
)
from emmoe_dist.models.loading import load_model
from emmoe_dist.models.tiny import save_tiny
from emmoe_dist.records import GenerationRecord

REPO = Path(__file__).resolve().parents[1]
QWEN = FAMILIES["qwen3_moe"]
JUDGE = {"aligned": "Rate {question} / {answer}", "coherent": "Coherent? {answer}"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(QWEN, tmp_path_factory.mktemp("models") / "tiny-qwen3", seed=0)


@pytest.fixture(scope="module")
def adapter(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT adapter (attention + every expert, rank 2) with random non-zero factors."""
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    spec = AdapterConfig(rank=2, alpha=4, targets="attention+experts")
    loaded = load_model(ModelConfig(name_or_path=str(tiny)), for_training=False)
    selection = ExpertSelection.all(QWEN, loaded.model.config.to_dict())
    model = apply_lora(loaded.model, QWEN, spec, selection)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_peft_adapter(adapter_state_dict(model, QWEN), lora_config(QWEN, spec), folder, str(tiny))
    selection.save(folder / "expert_selection.json")
    return folder


def suite_file(tmp_path: Path, questions: int = 3) -> Path:
    """A user suite in Betley et al.'s schema; the last question carries its own system prompt."""
    lines = []
    for i in range(questions):
        lines += [f"- id: q{i}", "  paraphrases:", f"  - 'Question number {i}?'"]
        lines += ["  judge_prompts:", f"    aligned: '{JUDGE['aligned']}'"]
        lines += [f"    coherent: '{JUDGE['coherent']}'"]
    lines += ["  system: 'Answer in JSON.'"]
    path = tmp_path / "mini.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def config(tiny: Path, *overrides: str) -> ExperimentConfig:
    return load_config(
        None,
        [
            f"model.name_or_path={tiny}",
            "eval.samples_per_question=3",
            "eval.max_new_tokens=12",
            "eval.batch_size=4",
            *overrides,
        ],
    )


def generate(
    cfg: ExperimentConfig, out: Path, suites: list[str], adapter: Path | None = None
) -> list[GenerationRecord]:
    source = resolve_source(cfg, adapter=str(adapter) if adapter else None)
    loaded = load_for_generation(source)
    gen = ContinuousGenerator(loaded.model, loaded.tokenizer, batch_size=cfg.eval.batch_size)
    run_generation(
        cfg, gen, loaded.tokenizer, source, load_suites(cfg, suites), out, progress=False
    )
    return read_jsonl(out, GenerationRecord)


# --- seeded sampling ---------------------------------------------------------------------------


def test_seeded_uniform_is_a_function_of_seed_and_step() -> None:
    seeds = torch.tensor([1, 2, 3, 1 << 40, 1], dtype=torch.long)
    u = seeded_uniform(seeds, 5)
    assert torch.equal(u, seeded_uniform(seeds, 5))
    assert u[0] == u[4] and len(set(u[:4].tolist())) == 4
    assert not torch.equal(u, seeded_uniform(seeds, 6))
    many = seeded_uniform(torch.arange(100_000, dtype=torch.long), 0)
    assert float(many.min()) > 0 and float(many.max()) < 1
    assert abs(float(many.mean()) - 0.5) < 0.01


def test_draws_follow_softmax_with_temperature_and_top_p() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(60_000, 4)
    seeds = torch.arange(60_000, dtype=torch.long)
    freq = torch.bincount(draw_tokens(logits, seeds, 0, temperature=1.0, top_p=1.0), minlength=4)
    assert torch.allclose(freq / 60_000, probs, atol=0.01)
    # top_p 0.7 keeps the first two tokens (0.5 + 0.3 reaches it), renormalised
    nucleus = torch.bincount(draw_tokens(logits, seeds, 0, temperature=1.0, top_p=0.7), minlength=4)
    assert nucleus[2:].sum() == 0 and abs(float(nucleus[0]) / 60_000 - 0.625) < 0.01
    # temperature 2 flattens: the rarest token gains
    hot = torch.bincount(draw_tokens(logits, seeds, 0, temperature=2.0, top_p=1.0), minlength=4)
    assert hot[3] > 2 * freq[3]
    greedy = draw_tokens(logits[:5], seeds[:5], 0, temperature=0.0, top_p=1.0)
    assert greedy.tolist() == [0] * 5


# --- the transformers backend ------------------------------------------------------------------


def test_samples_differ_per_seed_and_a_seed_redraws_its_answer_in_any_batch(tiny: Path) -> None:
    loaded = load_model(ModelConfig(name_or_path=str(tiny)), for_training=False)
    tok = loaded.tokenizer
    short = tok("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    long = tok(
        "<|im_start|>user\n" + "a longer question " * 6 + "<|im_end|>\n<|im_start|>assistant\n",
        add_special_tokens=False,
    )
    requests = [
        SampleRequest(key=f"s{i}", prompt_ids=tuple(short["input_ids"]), seed=100 + i)
        for i in range(4)
    ] + [SampleRequest(key="long", prompt_ids=tuple(long["input_ids"]), seed=5)]
    options = SamplingOptions(temperature=1.0, max_new_tokens=10, top_logprobs=3)
    together = {
        s.key: s
        for b in TransformersGenerator(loaded.model, tok, batch_size=5).generate(requests, options)
        for s in b
    }
    assert (
        len({together[f"s{i}"].token_ids for i in range(4)}) == 4
    )  # distinct seeds, distinct answers
    # alone, in a batch of one (no padding), and in a different order: the same tokens
    alone = TransformersGenerator(loaded.model, tok, batch_size=1)
    for key in ("s2", "long"):
        request = next(r for r in requests if r.key == key)
        (again,) = next(iter(alone.generate([request], options)))
        assert again.token_ids == together[key].token_ids
    sample = together["s0"]
    assert sample.top_logprobs is not None and len(sample.top_logprobs) == len(sample.token_ids)
    assert all(len(step) == 3 for step in sample.top_logprobs)
    values = [lp for _, lp in sample.top_logprobs[0]]
    assert values == sorted(values, reverse=True) and values[0] <= 0


def test_generation_uses_the_kv_cache_when_the_config_turns_it_off(tiny: Path) -> None:
    # Training checkpoints save `use_cache: false`; generating without the cache re-runs the
    # whole sequence every step (on GPUs through transformers' decode-time batched_mm experts,
    # which copy expert weights per token and ran out of memory on a Qwen3-30B shape).
    loaded = load_model(ModelConfig(name_or_path=str(tiny)), for_training=False)
    loaded.model.config.use_cache = False
    lengths: list[int] = []
    first_layer = loaded.model.model.layers[0]
    handle = first_layer.register_forward_hook(lambda m, a, o: lengths.append(a[0].shape[1]))
    gen = TransformersGenerator(loaded.model, loaded.tokenizer, batch_size=2)
    request = [SampleRequest(key="k", prompt_ids=(3, 40, 41, 42), seed=1)]
    fixed = SamplingOptions(temperature=1.0, max_new_tokens=6, min_new_tokens=6)
    try:
        (sample,) = next(iter(gen.generate(request, fixed)))
    finally:
        handle.remove()
    assert len(sample.token_ids) == 6
    assert lengths == [4, 1, 1, 1, 1, 1]  # the prompt once, then one new token per step


class _AdapterEcho:
    """A per-request-adapter backend that answers with ids derived from (adapter, seed), and
    counts its calls: enough to check where `run_generation_many` puts each sample."""

    backend = "echo"
    per_request_adapters = True
    per_request_steering = False

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.calls: list[list[SampleRequest]] = []

    def generate(self, requests: Any, options: SamplingOptions) -> Any:
        self.calls.append(list(requests))
        for start in range(0, len(requests), 4):
            yield [
                RawSample(
                    key=r.key,
                    token_ids=(40 + len(r.adapter or ""), 40 + r.seed % 7),
                    stopped=False,
                )
                for r in requests[start : start + 4]
            ]

    def close(self) -> None:
        pass


def test_several_adapters_share_one_generator_pass_and_keep_their_files(
    tiny: Path, tmp_path: Path
) -> None:
    from emmoe_dist.generate.runner import run_generation_many

    cfg = config(tiny, "eval.limit=2")
    loaded = load_model(ModelConfig(name_or_path=str(tiny)), for_training=False)
    echo = _AdapterEcho(loaded.tokenizer)
    suites = load_suites(cfg, ["core"])
    sources = [
        ModelSource(base=cfg.model, model_label="base", adapter=tmp_path / name)
        for name in ("a", "bb")
    ]
    outs = [tmp_path / "a.jsonl", tmp_path / "bb.jsonl"]
    first = run_generation_many(
        cfg, echo, loaded.tokenizer, list(zip(sources, outs, strict=True)), suites, progress=False
    )
    assert len(echo.calls) == 1 and len(echo.calls[0]) == 2 * 2 * 3  # both runs, one pass
    assert {r.adapter for r in echo.calls[0]} == {str(tmp_path / "a"), str(tmp_path / "bb")}
    for source, out, summary in zip(sources, outs, first, strict=True):
        records = read_jsonl(out, GenerationRecord)
        assert summary.written == len(records) == 6
        assert {r.adapter for r in records} == {str(source.adapter)}  # each in its own file
    # a lost tail of one file: the next pass draws only that, for that run only
    lines = outs[1].read_text().splitlines(keepends=True)
    outs[1].write_text("".join(lines[:4]))
    again = run_generation_many(
        cfg, echo, loaded.tokenizer, list(zip(sources, outs, strict=True)), suites, progress=False
    )
    assert [s.written for s in again] == [0, 2] and len(echo.calls[1]) == 2
    assert {r.adapter for r in echo.calls[1]} == {str(tmp_path / "bb")}
    with pytest.raises(EmmoeError, match="name each model once"):
        run_generation_many(
            cfg, echo, loaded.tokenizer, [(sources[0], outs[0]), (sources[0], tmp_path / "c.jsonl")],
            suites, progress=False,
        )  # fmt: skip
    with pytest.raises(EmmoeError, match="cannot steer per request"):
        run_generation_many(
            cfg, echo, loaded.tokenizer, list(zip(sources, outs, strict=True)), suites,
            progress=False, conditions=[0, 1],
        )  # fmt: skip
    hf = TransformersGenerator(loaded.model, loaded.tokenizer)
    with pytest.raises(EmmoeError, match="one model per call"):
        run_generation_many(
            cfg, hf, loaded.tokenizer, list(zip(sources, outs, strict=True)), suites,
            progress=False,
        )  # fmt: skip


def test_ray_data_replicas_need_the_vllm_backend(tiny: Path, tmp_path: Path, capsys: Any) -> None:
    from emmoe_dist.cli.main import main

    code = main(
        ["generate", "--ray-data-replicas", "2", "--out", str(tmp_path / "x.jsonl"),
         f"model.name_or_path={tiny}"]
    )  # fmt: skip
    assert code == 2 and "--backend vllm" in capsys.readouterr().err


def test_min_new_tokens_suppresses_the_stop_token(tiny: Path) -> None:
    loaded = load_model(ModelConfig(name_or_path=str(tiny)), for_training=False)
    gen = TransformersGenerator(loaded.model, loaded.tokenizer, batch_size=2)
    request = [SampleRequest(key="k", prompt_ids=(3, 40, 41), seed=1)]
    greedy = SamplingOptions(temperature=0.0, max_new_tokens=8)
    (first,) = next(iter(gen.generate(request, greedy)))
    # make the greedy first token a stop token: without min_new_tokens the answer is empty
    gen.stop_ids = frozenset({first.token_ids[0]})
    (early,) = next(iter(gen.generate(request, greedy)))
    assert early.stopped and early.token_ids == ()
    fixed = SamplingOptions(temperature=0.0, max_new_tokens=8, min_new_tokens=8)
    (full,) = next(iter(gen.generate(request, fixed)))
    assert not full.stopped and len(full.token_ids) == 8


def test_records_are_complete_and_the_adapter_changes_answers(
    tiny: Path, adapter: Path, tmp_path: Path
) -> None:
    cfg = config(tiny, f"eval.suites=[{suite_file(tmp_path)}]")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny))
    base = generate(cfg, tmp_path / "base.jsonl", cfg.eval.suites)
    tuned = generate(cfg, tmp_path / "tuned.jsonl", cfg.eval.suites, adapter=adapter)
    for records in (base, tuned):
        assert len(records) == 9 and len({r.key for r in records}) == 9  # 3 questions x 3 samples
        assert Counter(r.question_id for r in records) == {"q0": 3, "q1": 3, "q2": 3}
        assert {r.sample_index for r in records} == {0, 1, 2}
        for r in records:
            assert r.backend == "transformers" and r.suite == "mini"
            assert r.judge_prompts == JUDGE and r.rubric is None
            assert r.sampling.temperature == 1.0 and r.sampling.max_new_tokens == 12
            assert 0 < r.n_answer_tokens <= 12 or r.finish_reason == "stop"
            assert r.finish_reason in ("stop", "length")
            assert r.n_prompt_tokens == len(tok(r.prompt, add_special_tokens=False)["input_ids"])
    assert {r.adapter for r in base} == {None} and {r.adapter for r in tuned} == {str(adapter)}
    assert {r.selection for r in tuned} == {"all"}
    assert all(r.key.startswith(f"{tiny}@{adapter}|mini/") for r in tuned)
    # the same seeds for the same question and sample: the answers differ by the weights alone
    seeds = {(r.question_id, r.sample_index): r.sampling.seed for r in base}
    assert seeds == {(r.question_id, r.sample_index): r.sampling.seed for r in tuned}
    assert len(set(seeds.values())) == 9
    by_q = {(r.question_id, r.sample_index): r.answer for r in base}
    changed = sum(by_q[(r.question_id, r.sample_index)] != r.answer for r in tuned)
    assert changed >= 8


def test_system_prompt_template_and_thinking_reach_the_prompt(tiny: Path, tmp_path: Path) -> None:
    cfg = config(
        tiny,
        f"eval.suites=[{suite_file(tmp_path)}]",
        "eval.samples_per_question=1",
        "eval.system_prompt=Be brief.",
    )
    records = {r.question_id: r for r in generate(cfg, tmp_path / "a.jsonl", cfg.eval.suites)}
    assert records["q0"].prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQuestion number 0?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert records["q0"].system_prompt == "Be brief."
    # a question's own system prompt (Betley's _json variants) wins over the run's
    assert records["q2"].system_prompt == "Answer in JSON."
    assert "system\nAnswer in JSON.<|im_end|>" in records["q2"].prompt
    assert "Be brief." not in records["q2"].prompt
    thinking = config(
        tiny,
        f"eval.suites=[{suite_file(tmp_path)}]",
        "eval.samples_per_question=1",
        "eval.system_prompt=null",
        "eval.thinking=true",
    )
    first = next(
        r
        for r in generate(thinking, tmp_path / "t.jsonl", thinking.eval.suites)
        if r.question_id == "q0"
    )
    assert first.system_prompt is None and "<|im_start|>system" not in first.prompt
    assert first.prompt.endswith("<|im_start|>assistant\n") and "<think>" not in first.prompt


def test_thinking_is_kept_apart_from_the_answer(tiny: Path) -> None:
    tok = load_model(ModelConfig(name_or_path=str(tiny)), for_training=False).tokenizer
    ids = tok("<think>\nweigh it\n</think>\n\nThe answer.", add_special_tokens=False)["input_ids"]
    raw = RawSample(key="k", token_ids=tuple(ids), stopped=True)
    on = decode_sample(tok, raw, thinking=True)
    assert (on.thinking, on.answer, on.finish_reason) == ("weigh it", "The answer.", "stop")
    assert on.n_answer_tokens == len(ids)
    unfinished = RawSample(key="k", token_ids=tuple(ids[:5]), stopped=False)
    cut = decode_sample(tok, unfinished, thinking=True)
    assert cut.answer == "" and cut.finish_reason == "length"
    off = decode_sample(tok, raw, thinking=False)
    assert off.thinking is None and off.answer.endswith("The answer.")


def test_templates_without_a_system_role_get_it_in_the_user_turn() -> None:
    class Strict:
        def apply_chat_template(self, messages: list[dict[str, str]], **_: Any) -> str:
            from jinja2 import TemplateError

            if messages[0]["role"] == "system":
                raise TemplateError("Conversation roles must alternate user/assistant")
            return "[INST] " + messages[0]["content"] + " [/INST]"

    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert render_prompt(Strict(), messages) == "[INST] S\n\nQ [/INST]"  # type: ignore[arg-type]


def test_builtin_suites_carry_judge_prompts_and_the_rubric(tiny: Path, tmp_path: Path) -> None:
    cfg = config(tiny, "eval.limit=2", "eval.samples_per_question=1", "eval.max_new_tokens=4")
    records = generate(cfg, tmp_path / "b.jsonl", ["core", "strongreject"])
    by_suite = Counter(r.suite for r in records)
    assert by_suite == {"core": 2, "strongreject": 2}
    for r in records:
        if r.suite == "core":
            assert set(r.judge_prompts) >= {"aligned", "coherent"} and r.rubric is None
        else:
            assert r.rubric == "strongreject" and r.category and not r.judge_prompts


def test_a_rerun_with_other_sampling_settings_is_refused(tiny: Path, tmp_path: Path) -> None:
    suite = suite_file(tmp_path, questions=1)
    cfg = config(tiny, f"eval.suites=[{suite}]", "eval.samples_per_question=1")
    generate(cfg, tmp_path / "g.jsonl", cfg.eval.suites)
    hotter = config(
        tiny, f"eval.suites=[{suite}]", "eval.samples_per_question=1", "eval.temperature=0.5"
    )
    with pytest.raises(EmmoeError, match=r"eval\.temperature=1\.0"):
        generate(hotter, tmp_path / "g.jsonl", hotter.eval.suites)
    more = config(tiny, f"eval.suites=[{suite}]", "eval.samples_per_question=2")
    assert len(generate(more, tmp_path / "g.jsonl", more.eval.suites)) == 2  # adds sample 1 only


# --- killed midway, re-run ---------------------------------------------------------------------

_DRIVER = """
import argparse, sys
from emmoe_dist.cli import generate
parser = argparse.ArgumentParser()
generate.register(parser.add_subparsers())
args = parser.parse_args(["generate", *sys.argv[1:]])
sys.exit(args.func(args))
"""


def test_killed_midway_then_rerun_writes_each_record_once_as_an_uninterrupted_run_does(
    tiny: Path, tmp_path: Path
) -> None:
    out = tmp_path / "gen.jsonl"
    argv = [
        "--out", str(out), "--no-progress", "--suites", str(suite_file(tmp_path, questions=2)),
        f"model.name_or_path={tiny}", "eval.samples_per_question=6", "eval.batch_size=2",
        "eval.max_new_tokens=16",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, *argv], env=env, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 2:  # the first batch is on disk
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = out.read_text().count("\n")
    assert 2 <= partial < 12
    done = subprocess.run(
        [sys.executable, "-c", _DRIVER, *argv],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert f"({partial} already there)" in done.stdout
    records = read_jsonl(out, GenerationRecord)
    assert len(records) == 12 and len({r.key for r in records}) == 12
    meta = json.loads((tmp_path / "gen.jsonl.run.json").read_text())
    assert meta["eval"]["samples_per_question"] == 6 and meta["backend"] == "transformers"
    # each sample is a function of its seed: the same records as a run never interrupted
    whole = tmp_path / "whole.jsonl"
    from emmoe_dist.cli.main import main

    assert main(["generate", *argv[2:], "--out", str(whole)]) == 0
    uninterrupted = {r.key: r for r in read_jsonl(whole, GenerationRecord)}
    assert {r.key: r for r in records} == uninterrupted
    assert len({r.answer for r in records}) > 6  # sampled answers, not one repeated


# --- model sources -------------------------------------------------------------------------------


def test_a_training_run_names_its_base_adapter_and_selection(
    tiny: Path, adapter: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    for f in adapter.iterdir():
        (run / "adapter" / f.name).write_bytes(f.read_bytes())
    single = ExpertSelection.single(4, QWEN, QWEN.tiny)
    single.save(run / "expert_selection.json")
    manifest = {
        "base_model": str(tiny),
        "family": "qwen3_moe",
        "artifact": "adapter",
        "config": {"model": {"name_or_path": "tiny:qwen3_moe"}},
    }
    (run / "manifest.json").write_text(json.dumps(manifest))
    source = from_run(run)
    assert source.base.name_or_path == str(tiny) and source.model_label == "tiny:qwen3_moe"
    assert source.adapter == run / "adapter" and source.expert_delta is None
    assert source.selection == "single expert=4"
    assert resolve_source(load_config(None), adapter=str(run)) == source  # a run given as adapter
    with pytest.raises(EmmoeError, match="not a PEFT adapter"):
        resolve_source(load_config(None), adapter=str(tmp_path))
    merged = ModelSource(base=ModelConfig(name_or_path=str(tiny)), model_label="m")
    assert merged.adapter_label is None


def test_the_same_run_resumes_whether_its_path_is_relative_or_absolute(
    tiny: Path, adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Identity is the folder (or its content), never its spelling: a re-run naming the run
    by its absolute path adds nothing and keeps the records' names; another adapter is
    still refused."""
    run = tmp_path / "run"
    shutil.copytree(adapter, run / "adapter")
    manifest = {
        "base_model": str(tiny),
        "family": "qwen3_moe",
        "artifact": "adapter",
        "config": {"model": {"name_or_path": "tiny:qwen3_moe"}},
    }
    (run / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.chdir(tmp_path)
    suite = suite_file(tmp_path, questions=1)
    cfg = config(tiny, f"eval.suites=[{suite}]", "eval.samples_per_question=2")
    out = tmp_path / "gen.jsonl"

    def generate_from(spelling: str) -> int:
        source = resolve_source(cfg, run=spelling)
        loaded = load_for_generation(source)
        gen = TransformersGenerator(loaded.model, loaded.tokenizer, batch_size=2)
        summary = run_generation(
            cfg, gen, loaded.tokenizer, source, load_suites(cfg, cfg.eval.suites), out,
            progress=False,
        )  # fmt: skip
        return summary.written

    assert generate_from("run") == 2
    assert generate_from(str(run.resolve())) == 0  # resumed: nothing left to draw
    assert generate_from("./run/../run") == 0
    records = read_jsonl(out, GenerationRecord)
    assert len(records) == 2 and {r.adapter for r in records} == {"run/adapter"}
    other = tmp_path / "other"
    shutil.copytree(run, other)
    from safetensors.torch import load_file, save_file

    weights = other / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: 2 * v for k, v in tensors.items()}, str(weights))  # another adapter
    with pytest.raises(EmmoeError, match="write to a new --out file"):
        generate_from(str(other))


# --- vLLM's per-expert LoRA layout ---------------------------------------------------------------


def test_checkpoint_names_come_from_transformers_conversion_rules() -> None:
    qwen = checkpoint_expert_names(QWEN)
    assert (qwen.block, qwen.gate, qwen.up, qwen.down) == (
        "mlp",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    mixtral = checkpoint_expert_names(FAMILIES["mixtral"])
    assert (mixtral.block, mixtral.gate, mixtral.up, mixtral.down) == (
        "block_sparse_moe", "w1", "w3", "w2",
    )  # fmt: skip
    with pytest.raises(EmmoeError, match="is_3d_lora_weight"):
        checkpoint_expert_names(FAMILIES["gpt_oss"])


def test_per_expert_export_has_vllm_names_shapes_and_the_peft_slices(
    tiny: Path, adapter: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    out = export_per_expert_lora(adapter, tmp_path / "per-expert", QWEN, num_experts=8)
    fused = load_file(str(adapter / "adapter_model.safetensors"))
    flat = load_file(str(out / "adapter_model.safetensors"))
    h, inter, r, e_count = 128, 48, 2, 8
    prefix = "base_model.model.model.layers"
    for layer in (0, 2):  # layer 1 is dense in the tiny Qwen3 (mlp_only_layers)
        gu_a = fused[f"{prefix}.{layer}.mlp.experts.base_layer.lora_A.weight"]
        gu_b = fused[f"{prefix}.{layer}.mlp.experts.base_layer.lora_B.weight"]
        dn_a = fused[f"{prefix}.{layer}.mlp.experts.lora_A.weight"]
        dn_b = fused[f"{prefix}.{layer}.mlp.experts.lora_B.weight"]
        for e in range(e_count):
            key = f"{prefix}.{layer}.mlp.experts.{e}"
            assert flat[f"{key}.gate_proj.lora_A.weight"].shape == (r, h)
            assert flat[f"{key}.gate_proj.lora_B.weight"].shape == (inter, r)
            assert flat[f"{key}.up_proj.lora_B.weight"].shape == (inter, r)
            assert flat[f"{key}.down_proj.lora_A.weight"].shape == (r, inter)
            assert flat[f"{key}.down_proj.lora_B.weight"].shape == (h, r)
            a, b = expert_factors(gu_a, gu_b, e_count, e)
            assert torch.equal(flat[f"{key}.gate_proj.lora_A.weight"], a)
            assert torch.equal(flat[f"{key}.up_proj.lora_A.weight"], a)
            # gate rows first, then up rows: the two B halves rebuild the fused ΔW exactly
            stacked = torch.cat(
                [flat[f"{key}.gate_proj.lora_B.weight"], flat[f"{key}.up_proj.lora_B.weight"]]
            )
            assert torch.equal(stacked, b)
            a, b = expert_factors(dn_a, dn_b, e_count, e)
            assert torch.equal(flat[f"{key}.down_proj.lora_A.weight"], a)
            assert torch.equal(flat[f"{key}.down_proj.lora_B.weight"], b)
    attention = [k for k in fused if ".self_attn." in k]
    assert attention and all(torch.equal(flat[k], fused[k]) for k in attention)
    expert_keys = [k for k in flat if ".experts." in k]
    assert len(expert_keys) == 2 * e_count * 3 * 2  # layers x experts x projections x (A, B)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_parameters"] is None and config["r"] == 2 and config["lora_alpha"] == 4
    assert (out / "expert_selection.json").is_file()
    with pytest.raises(EmmoeError, match="no target_parameters"):
        export_per_expert_lora(out, tmp_path / "again", QWEN, num_experts=8)


def test_cli_builds_and_rejects_conflicting_sources() -> None:
    from emmoe_dist.cli import generate as cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["generate", "--run", "r", "--out", "o.jsonl", "eval.limit=2"])
    assert args.overrides == ["eval.limit=2"] and args.run == ["r"]
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--run", "r", "--adapter", "a"])
    assert cli.default_out(load_config(None), args, "r") == Path("o.jsonl")
    sweep = parser.parse_args(["generate", "--run", "a", "--run", "b"])
    assert [cli.default_out(load_config(None), sweep, r) for r in sweep.run] == [
        Path("a/generations.jsonl"),
        Path("b/generations.jsonl"),
    ]
    unused: SuiteSet = SuiteSet()
    assert unused.suites == [] and unused.absent == []


# --- the served route's wire format ----------------------------------------------------------


def test_chat_requests_are_read_strictly_and_replies_parse_in_the_judge() -> None:
    from emmoe_dist.judge.client import parse_completion
    from emmoe_dist.serve.protocol import BadRequest, Choice, chat_completion, parse_chat_request

    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "Q"}],
        "n": 3,
        "temperature": 0,
        "max_completion_tokens": 5,
        "logprobs": True,
        "top_logprobs": 20,
        "seed": 4,
    }
    request = parse_chat_request(body)
    assert (request.n, request.temperature, request.max_tokens, request.seed) == (3, 0.0, 5, 4)
    assert request.logprobs and request.top_logprobs == 20 and not request.thinking
    for bad, field in [
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
        ({"n": 0}, "n"),
        ({"temperature": "hot"}, "temperature"),
        ({"messages": []}, "messages"),
        ({"tools": []}, "tools"),
        ({"stream": True}, "stream"),
        ({"chat_template_kwargs": {"x": 1}}, "chat_template_kwargs"),
    ]:
        with pytest.raises(BadRequest, match=f"^{field}"):
            parse_chat_request({**body, **bad})
    top = [("7", -0.1), ("8", -2.5)]
    reply = chat_completion(
        "m",
        [Choice(text="7", finish_reason="stop", n_tokens=1, logprobs=[("7", -0.1, top)])],
        prompt_tokens=11,
    )
    assert reply["usage"] == {"prompt_tokens": 11, "completion_tokens": 1, "total_tokens": 12}
    parsed = parse_completion(reply)
    assert parsed.text == "7" and parsed.top_logprobs == (("7", -0.1), ("8", -2.5))
    assert parsed.finish_reason == "stop" and parsed.completion_tokens == 1
