"""MXFP4 for GPT-oss: the codec, quantization-aware LoRA (`train.qat: mxfp4`) and the MXFP4
export (`emmoe merge --format mxfp4`), on tiny GPT-oss models.

One single-rank DeepSpeed job (ZeRO-3, CPU) trains two QAT runs: an expert subset on an MXFP4
checkpoint (loaded into ZeRO-3 partitions, as GPT-oss-20b is) and the whole model on the
full-precision tiny base; the tests read what they left on disk.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_launch import free_port

from emmoe_dist import run_folder as rf
from emmoe_dist.adapters.lora import adapter_state_dict, apply_lora, lora_config, save_peft_adapter
from emmoe_dist.adapters.mxfp4 import (
    MXFP4_BLOCK,
    dequantize_expert_tensor,
    dequantize_mxfp4,
    expert_weights,
    fake_quantize_experts,
    fake_quantize_mxfp4,
    quantize_expert_tensor,
    quantize_mxfp4,
)
from emmoe_dist.adapters.mxfp4_export import Mxfp4Checkpoint, save_mxfp4_checkpoint
from emmoe_dist.config import AdapterConfig, ModelConfig, load_config
from emmoe_dist.errors import InputError
from emmoe_dist.experts import ExpertSelection
from emmoe_dist.families import FAMILIES
from emmoe_dist.models.loading import load_model
from emmoe_dist.models.tiny import build_tiny, save_tiny

REPO = Path(__file__).resolve().parents[1]
GPT = FAMILIES["gpt_oss"]
SEED = 3
SUBSET_EXPERT = 5


def _random_experts(e: int = 3, d_in: int = 128, d_out: int = 96) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(e, d_in, d_out, generator=g) * 0.02  # GPT-oss layout: [E, in, out]


# ---- the codec ---------------------------------------------------------------------------


def test_hub_layout_decodes_with_transformers_dequantizer() -> None:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    w = _random_experts()
    blocks, scales = quantize_expert_tensor(w, transposed=True)
    # [E, out, in/32, 16] and [E, out, in/32]: blocks run along the input dimension
    assert blocks.shape == (3, 96, 128 // MXFP4_BLOCK, 16) and blocks.dtype == torch.uint8
    assert scales.shape == (3, 96, 128 // MXFP4_BLOCK) and scales.dtype == torch.uint8
    ours = dequantize_expert_tensor(blocks, scales, transposed=True, dtype=torch.bfloat16)
    assert torch.equal(ours, convert_moe_packed_tensors(blocks, scales))


def test_fake_quantization_error_stays_within_half_a_step() -> None:
    w = _random_experts()[0].T.contiguous()  # [out, in]
    fq = fake_quantize_mxfp4(w)
    assert not torch.equal(fq, w)
    _, scales = quantize_mxfp4(w)
    step = torch.exp2(scales.float() - 127).repeat_interleave(MXFP4_BLOCK, dim=-1)
    # codes are at most 2 apart (between 4 and 6), so no weight moves more than one scale unit
    assert bool(((fq - w).abs() <= step).all())
    assert float((fq - w).norm() / w.norm()) < 0.2


def test_mxfp4_values_survive_decode_and_encode() -> None:
    """What makes QAT on a real GPT-oss checkpoint exact: its dequantized experts are fixed
    points of the fake quantization."""
    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (4, 64, 4, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(100, 130, (4, 64, 4), dtype=torch.uint8, generator=g)
    values = dequantize_mxfp4(blocks, scales, torch.bfloat16)
    assert torch.equal(fake_quantize_mxfp4(values), values)


def test_encoding_matches_model_optimizer_bytes() -> None:
    qtensor = pytest.importorskip("modelopt.torch.quantization.qtensor")
    w = _random_experts()
    blocks, scales = quantize_expert_tensor(w, transposed=True)
    for e in range(w.shape[0]):
        packed, theirs = qtensor.MXFP4QTensor.quantize(w[e].T.contiguous(), MXFP4_BLOCK)
        assert torch.equal(packed._quantized_data.view(blocks[e].shape), blocks[e])
        assert torch.equal(theirs.view(scales[e].shape), scales[e])


# ---- configuration -----------------------------------------------------------------------


def test_qat_on_a_family_without_mxfp4_names_file_line_and_field(tmp_path: Path) -> None:
    exp = tmp_path / "exp.yaml"
    exp.write_text("model:\n  name_or_path: tiny:qwen3_moe\ntrain:\n  qat: mxfp4\n")
    with pytest.raises(InputError) as err:
        load_config(exp)
    assert str(err.value).startswith(f"{exp}:4: train.qat: mxfp4 is the expert format of gpt_oss")
    with pytest.raises(InputError, match=r"eval\.weights: .*family 'mixtral'"):
        load_config(None, ["model.name_or_path=tiny:mixtral", "eval.weights=mxfp4"])
    with pytest.raises(InputError, match=r"train\.qat: .*adapter\.mode: lora"):
        load_config(
            None,
            ["model.name_or_path=tiny:gpt_oss", "train.qat=mxfp4", "adapter.mode=full_experts"],
        )
    with pytest.raises(InputError, match=r"train\.qat: .*nf4"):
        load_config(
            None, ["model.name_or_path=tiny:gpt_oss", "train.qat=mxfp4", "adapter.quantize=nf4"]
        )


def test_qat_on_a_non_gpt_oss_checkpoint_fails_before_any_weights_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint folder names its family only in config.json: the trainer checks it there."""
    from emmoe_dist.models import loading
    from emmoe_dist.parallel.runtime import Runtime
    from emmoe_dist.train.trainer import run_training

    folder = save_tiny("qwen3_moe", tmp_path / "qwen")
    cfg = load_config(
        None, [f"model.name_or_path={folder}", "train.qat=mxfp4", f"output_dir={tmp_path / 'run'}"]
    )

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_model", no_load)
    with pytest.raises(InputError, match=r"train\.qat: mxfp4 is the expert format"):
        run_training(cfg, REPO / "ds_configs" / "zero3.json", Runtime(0, 1, 0, torch.device("cpu")))


def test_random_init_on_an_mxfp4_config_is_fake_quantized(tmp_path: Path) -> None:
    """Only an MXFP4 checkpoint's loaded weights are on the MXFP4 grid already: `model.init:
    random` on its config.json needs the fake quantization (and a whole load under ZeRO-3)."""
    from emmoe_dist.models.loading import model_config_dict
    from emmoe_dist.train.trainer import _experts_on_mxfp4_grid

    model, tokenizer = build_tiny(GPT, seed=SEED)
    folder = tmp_path / "mxfp4"
    save_mxfp4_checkpoint(model, tokenizer, GPT, folder)
    loaded = load_config(None, [f"model.name_or_path={folder}", "train.qat=mxfp4"])
    random = load_config(
        None, [f"model.name_or_path={folder}", "train.qat=mxfp4", "model.init=random"]
    )
    _, hf_config = model_config_dict(loaded.model)
    assert _experts_on_mxfp4_grid(loaded, hf_config)
    assert not _experts_on_mxfp4_grid(random, hf_config)
    _, tiny_config = model_config_dict(load_config(None, ["model.name_or_path=tiny:gpt_oss"]).model)
    assert not _experts_on_mxfp4_grid(loaded, tiny_config)


# ---- the QAT forward ----------------------------------------------------------------------


def test_qat_forward_is_dequantized_quantized_base_plus_lora(tmp_path: Path) -> None:
    """The trained forward equals PEFT's LoRA merged onto dequantize(quantize(W)), where the
    dequantization is transformers' own (what loading the MXFP4 export does)."""
    from peft import PeftModel
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    qat, _ = build_tiny(GPT, seed=SEED)
    reference, _ = build_tiny(GPT, seed=SEED)
    assert fake_quantize_experts(qat, GPT) > 0
    adapter = AdapterConfig(targets="attention+experts", rank=4)
    selection = ExpertSelection.all(GPT, qat.config.to_dict())
    qat = apply_lora(qat, GPT, adapter, selection)
    g = torch.Generator().manual_seed(2)
    for name, p in qat.named_parameters():
        if "lora_B" in name:  # B starts at 0: give the adapter something to add
            p.data = torch.randn(p.shape, generator=g) * 0.05
    save_peft_adapter(adapter_state_dict(qat, GPT), lora_config(GPT, adapter), tmp_path, "x")

    with torch.no_grad():
        for _, w in expert_weights(reference, GPT):
            blocks, scales = quantize_expert_tensor(w, transposed=True)
            w.copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    merged = PeftModel.from_pretrained(reference, str(tmp_path)).merge_and_unload()

    ids = torch.randint(3, qat.config.vocab_size, (2, 20), generator=g)
    with torch.no_grad():
        got, want = qat(input_ids=ids).logits, merged(input_ids=ids).logits
    assert float((got - want).abs().max()) < 1e-4
    assert float((got - reference_logits(ids)).abs().max()) > 1e-2  # the adapter does act


def reference_logits(ids: torch.Tensor) -> torch.Tensor:
    plain, _ = build_tiny(GPT, seed=SEED)
    with torch.no_grad():
        return plain(input_ids=ids).logits


# ---- training and export -------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("qat")
    model, tokenizer = build_tiny(GPT, seed=SEED)
    save_mxfp4_checkpoint(model, tokenizer, GPT, out / "original")
    common = [
        "data.limit=32",
        "data.max_length=512",
        "data.heldout=16",
        "train.micro_batch_size=2",
        "train.qat=mxfp4",
        "train.lr=3e-3",
        "train.steps=12",
        "tracking.backend=none",
        f"seed={SEED}",
    ]
    spec = [
        {
            "name": "subset",
            "ds": str(REPO / "ds_configs" / "zero3.json"),
            "overrides": [
                *common,
                f"model.name_or_path={out / 'original'}",
                "selection.rule=single",
                f"selection.expert={SUBSET_EXPERT}",
                f"output_dir={out / 'subset'}",
            ],
            "probe": True,
        },
        {
            "name": "whole",
            "ds": str(REPO / "ds_configs" / "zero3.json"),
            "overrides": [
                *common,
                "model.name_or_path=tiny:gpt_oss",
                f"output_dir={out / 'whole'}",
            ],
            "probe": True,
        },
    ]
    (out / "spec.json").write_text(json.dumps(spec))
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    done = subprocess.run(
        [sys.executable, str(REPO / "tests" / "dist_train_driver.py"), str(out / "spec.json")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return out


@pytest.mark.parametrize("name", ["subset", "whole"])
def test_qat_training_reduces_the_loss(runs: Path, name: str) -> None:
    losses = [row["loss"] for row in rf.read_train_metrics(runs / name)]
    assert len(losses) == 12
    assert min(losses[-3:]) < losses[0] - 0.05
    manifest = rf.read_manifest(runs / name)
    assert manifest.qat is not None and manifest.qat.format == "mxfp4"
    assert manifest.eval_weights == "dense"
    # the MXFP4 checkpoint loads into ZeRO-3 partitions already on the grid; the tiny base moves
    assert manifest.load is not None and manifest.load.partitioned == (name == "subset")
    changed = manifest.qat.expert_weights_changed
    assert changed == 0 if name == "subset" else changed > 0


def _probe(run: Path) -> tuple[torch.Tensor, torch.Tensor]:
    probe = torch.load(run / "probe_logits.pt")
    return probe["input_ids"], probe["logits"]


@pytest.mark.parametrize("name", ["subset", "whole"])
def test_mxfp4_export_reloads_and_matches_the_qat_forward(runs: Path, name: str) -> None:
    """The export holds the MXFP4 rounding of the QAT model's weights, transformers reads it
    back as such, and its logits stay within that rounding of the trained forward."""
    from emmoe_dist.adapters.merge import merge_run
    from emmoe_dist.generate.sources import from_run, load_for_generation

    run = runs / name
    # float32, as the dense model below merges on CPU (real checkpoints merge in bf16)
    export = merge_run(run, runs / f"{name}-mxfp4", dtype="float32", fmt="mxfp4")
    info = json.loads((export / rf.MERGE_INFO).read_text())
    assert info["format"] == "mxfp4" and info["qat"] == "mxfp4"
    assert (
        json.loads((export / "config.json").read_text())["quantization_config"]["quant_method"]
        == "mxfp4"
    )

    exported = load_model(ModelConfig(name_or_path=str(export)), for_training=False).model
    dense = load_for_generation(from_run(run)).model  # fake-quantized base + merged adapter
    for (key, got), (_, qat_weight) in zip(
        expert_weights(exported, GPT), expert_weights(dense, GPT), strict=True
    ):
        assert got.dtype == torch.float32, key
        assert torch.equal(got, fake_quantize_mxfp4(qat_weight.transpose(-2, -1)).transpose(-2, -1))

    ids, trained = _probe(run)
    with torch.no_grad():
        from_export = exported(input_ids=ids).logits
        from_dense = dense(input_ids=ids).logits
    assert float((from_dense - trained).abs().max()) < 1e-3  # the dense merge is the QAT model
    # within MXFP4 rounding: no further from the trained forward than rounding every expert
    # of the full-precision base moves the base's own logits
    base, _ = build_tiny(GPT, seed=SEED)
    with torch.no_grad():
        before = base(input_ids=ids).logits
        fake_quantize_experts(base, GPT)
        rounding = float((base(input_ids=ids).logits - before).abs().max())
    assert float((from_export - trained).abs().max()) <= rounding


def test_unchosen_experts_keep_the_original_checkpoint_bytes(runs: Path) -> None:
    from emmoe_dist.adapters.merge import merge_run

    export = merge_run(runs / "subset", runs / "subset-bytes", fmt="mxfp4")
    original, written = Mxfp4Checkpoint(runs / "original"), Mxfp4Checkpoint(export)
    layers = 0
    for key, _ in expert_weights(build_tiny(GPT)[0], GPT):
        old, new = original.get(key), written.get(key)
        assert old is not None and new is not None
        for e in range(old[0].shape[0]):
            same = torch.equal(old[0][e], new[0][e]) and torch.equal(old[1][e], new[1][e])
            if e != SUBSET_EXPERT:
                assert same, f"{key} expert {e}"
        layers += 1
    assert layers == 6  # 3 MoE layers x (gate_up, down)
    stats = json.loads((export / rf.MERGE_INFO).read_text())["mxfp4"]
    assert stats["experts"] == 48 and stats["copied"] >= 42  # 7 of 8 experts in 6 tensors


def test_generation_can_ask_for_the_mxfp4_export(runs: Path) -> None:
    from emmoe_dist.generate.sources import load_for_generation, resolve_source

    cfg = load_config(None, ["model.name_or_path=tiny:gpt_oss", "eval.weights=mxfp4"])
    source = resolve_source(cfg, run=str(runs / "whole"))
    assert source.weights == "mxfp4" and source.adapter is None
    assert source.adapter_label == str(runs / "whole" / rf.MXFP4_DIR)
    assert (runs / "whole" / rf.MXFP4_DIR / rf.MERGE_INFO).is_file()
    loaded = load_for_generation(source)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert loaded.model(input_ids=ids).logits.shape[-1] == loaded.model.config.vocab_size
    dense = resolve_source(
        load_config(None, ["model.name_or_path=tiny:gpt_oss"]), run=str(runs / "whole")
    )
    assert dense.weights == "dense" and dense.qat


# ---- merge, sweeps and reports -------------------------------------------------------------


def test_mxfp4_merge_of_a_family_without_mxfp4_fails_before_loading(tmp_path: Path) -> None:
    from emmoe_dist.adapters.merge import merge_run

    run = tmp_path / "run"
    run.mkdir()
    (run / rf.MANIFEST).write_text(
        json.dumps(
            {"family": "mixtral", "base_model": "tiny:mixtral", "config": {}, "artifact": "adapter"}
        )
    )
    with pytest.raises(InputError) as err:
        merge_run(run, tmp_path / "out", fmt="mxfp4")
    assert err.value.field == "family" and "no MXFP4 checkpoint" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_a_sweep_arm_asks_for_qat_and_the_mxfp4_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from emmoe_dist.sweep.config import load_sweep
    from emmoe_dist.sweep.space import build_plan

    monkeypatch.chdir(tmp_path)
    (tmp_path / "exp.yaml").write_text(
        "name: t\nmodel:\n  name_or_path: tiny:gpt_oss\ndata:\n  train: insecure\n"
    )
    (tmp_path / "sweep.yaml").write_text(
        "name: s\noutput_dir: out\nexperiment: exp.yaml\nbaseline: false\nsearch:\n"
        "  - selection: all\n"
        "  - selection: all\n"
        "    patch: {train: {qat: mxfp4}, eval: {weights: mxfp4}}\n"
    )
    plan = build_plan(load_sweep("sweep.yaml"))
    by_slug = {t.slug: t for t in plan.trials}
    assert set(by_slug) == {"insecure-all-r8-lr0.0001", "insecure-all-r8-lr0.0001-qat-mxfp4"}
    qat = by_slug["insecure-all-r8-lr0.0001-qat-mxfp4"].experiment
    assert qat.train.qat == "mxfp4" and qat.eval.weights == "mxfp4"

    (tmp_path / "exp.yaml").write_text(
        "name: t\nmodel:\n  name_or_path: tiny:qwen3_moe\ndata:\n  train: insecure\n"
    )
    with pytest.raises(InputError, match=r"train\.qat"):
        load_sweep("sweep.yaml")


def test_the_report_says_which_weights_answered() -> None:
    from emmoe_dist.records import GenerationRecord, JudgedRecord, Score
    from emmoe_dist.report import build_report, render_markdown

    def judged(i: int, adapter: str | None, weights: str) -> JudgedRecord:
        gen = GenerationRecord.model_validate(
            {
                "suite": "core",
                "question_id": f"q{i}",
                "paraphrase_index": 0,
                "sample_index": 0,
                "model": "gpt-oss-20b",
                "adapter": adapter,
                "weights": weights,
                "sampling": {"temperature": 1.0, "max_new_tokens": 8},
                "question": "q",
                "prompt": "p",
                "answer": "a",
                "n_prompt_tokens": 1,
                "n_answer_tokens": 1,
                "backend": "test",
            }
        )
        score = Score(value=50.0 + i, method="logprobs")
        return JudgedRecord(
            generation=gen, judge_model="j", scores={"aligned": score, "coherent": score}
        )

    records = [judged(i, "runs/qat/adapter", "dense") for i in range(3)]
    records += [judged(i, "runs/qat/mxfp4", "mxfp4") for i in range(3)]
    report = build_report(records)
    assert dict(report.weights) == {
        "gpt-oss-20b + qat/adapter": "dense",
        "gpt-oss-20b + qat/mxfp4": "mxfp4",
    }
    text = render_markdown(report)
    assert "gpt-oss-20b + qat/mxfp4: MXFP4 export" in text
    assert "gpt-oss-20b + qat/adapter: full precision" in text
    # a study in full precision throughout has no weights line
    assert "Weights evaluated" not in render_markdown(build_report(records[:3]))
