"""Every fast path of a training step computes its plain PyTorch reference's outputs and gradients.

The CUDA kernels themselves (varlen flash attention, liger's fused cross-entropy) cannot run
here; their plumbing is tested with the reference kernel in their place, and
benchmarks/fast_paths_check.py compares the kernels on the GPU.
"""

from __future__ import annotations

import pytest
import torch

from emmoe_dist.adapters.expert_pass import sort_pairs
from emmoe_dist.adapters.grouped_lora import GroupedLoraExperts
from emmoe_dist.adapters.lora import apply_lora, expert_adapters, restrict_to_selection
from emmoe_dist.config import AdapterConfig
from emmoe_dist.experts import ExpertSelection
from emmoe_dist.families import FAMILIES
from emmoe_dist.models.causal_loss import CausalLMLoss
from emmoe_dist.models.checkpointing import (
    checkpoint_layers,
    plan_checkpointing,
    recompute_contexts,
    same_in_recompute,
)
from emmoe_dist.models.packed_attention import (
    segment_kwargs,
    use_packed_attention,
    varlen_reference,
)
from emmoe_dist.models.tiny import build_tiny
from emmoe_dist.parallel.memory_plan import ParamCounts, plan_memory
from emmoe_dist.train.step_profile import classify

FAMS = ["mixtral", "qwen3_moe", "gpt_oss", "olmoe"]


def _lora_model(family: str, selection: ExpertSelection | None = None) -> torch.nn.Module:
    fam = FAMILIES[family]
    model, _ = build_tiny(fam, seed=3)
    sel = selection or ExpertSelection.all(fam, model.config.to_dict())
    model = apply_lora(model, fam, AdapterConfig(rank=4, alpha=8, targets="attention+experts"), sel)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero B too, so every factor has a gradient
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    restrict_to_selection(model, sel)
    return model


def _grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss), grads


def _set_impl(model: torch.nn.Module, impl: str) -> None:
    for m in model.modules():
        if isinstance(m, GroupedLoraExperts):
            m.implementation = impl


@pytest.mark.parametrize("family", FAMS)
def test_fused_expert_pass_matches_reference(family: str) -> None:
    model = _lora_model(family)
    ids = torch.randint(
        3, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1)
    )
    _set_impl(model, "reference")
    ref_loss, ref = _grads(model, ids)
    _set_impl(model, "fused")
    loss, fused = _grads(model, ids)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert ref.keys() == fused.keys() and any("lora_A" in n for n in ref)
    for name in ref:
        torch.testing.assert_close(fused[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_pass_keeps_unchosen_experts_at_exactly_zero_gradient() -> None:
    fam = FAMILIES["qwen3_moe"]
    cfg = build_tiny(fam, seed=3)[0].config.to_dict()
    selection = ExpertSelection.single(2, fam, cfg)
    model = _lora_model("qwen3_moe", selection)
    ids = torch.randint(
        3, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1)
    )
    _grads(model, ids)
    for _, module in expert_adapters(model):
        for name in module.names:
            a = module.lora_A[name].grad.view(module.num_experts, module.rank, -1)
            b = module.lora_B[name].grad.view(-1, module.rank, module.num_experts)
            for e in range(module.num_experts):
                if e != 2:
                    assert float(a[e].abs().max()) == 0.0 and float(b[:, :, e].abs().max()) == 0.0
            assert float(a[2].abs().max()) > 0.0


def test_sorted_pairs_offsets_count_each_expert() -> None:
    idx = torch.tensor([[3, 0], [3, 1], [0, 3], [1, 0]])
    pairs = sort_pairs(idx, 5)
    assert pairs.offs.tolist() == [3, 5, 5, 8, 8]  # expert 2 and 4 empty
    assert pairs.ids.tolist() == [0, 0, 0, 1, 1, 3, 3, 3]
    # rows are in token order within an expert (stable), and point at the right tokens
    assert pairs.rows.tolist() == [0, 2, 3, 1, 3, 0, 1, 2]


def test_segments_of_packed_rows() -> None:
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    seg = segment_kwargs(pos)
    assert seg["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 10, 12]
    assert seg["max_length_q"] == 4


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "olmoe"])
def test_packed_attention_keeps_documents_apart(family: str) -> None:
    """Two documents packed in one row give the logits of each run alone, and the gradients
    of the model's own block-diagonal sdpa path."""
    model = _lora_model(family)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, model.config.vocab_size, (2, 30), generator=g)
    pos = torch.tensor([list(range(12)) + list(range(18)), list(range(7)) + list(range(23))])
    with torch.no_grad():
        alone = torch.cat(
            [model(input_ids=ids[:1, :12]).logits, model(input_ids=ids[:1, 12:]).logits], 1
        )
    model.zero_grad()
    sdpa = model(input_ids=ids, position_ids=pos, labels=ids, use_cache=False)
    sdpa.loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    use_packed_attention(model, varlen_reference)
    model.zero_grad()
    out = model(input_ids=ids, position_ids=pos, labels=ids, use_cache=False, **segment_kwargs(pos))
    out.loss.backward()
    torch.testing.assert_close(out.logits[:1], alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.loss, sdpa.loss)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("family", FAMS)
def test_loss_module_equals_the_models_own_loss(family: str) -> None:
    model = _lora_model(family)
    ids = torch.randint(
        3, model.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(4)
    )
    labels = ids.clone()
    labels[:, :6] = -100
    model.zero_grad()
    own = model(input_ids=ids, labels=labels, use_cache=False).loss
    own.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    wrapped = CausalLMLoss(model, FAMILIES[family])(input_ids=ids, labels=labels)
    wrapped.backward()
    torch.testing.assert_close(wrapped, own)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, ref[n], msg=n)


def test_partial_checkpointing_changes_no_gradient() -> None:
    fam = FAMILIES["qwen3_moe"]
    model = _lora_model("qwen3_moe")
    model.enable_input_require_grads()
    model.train()
    ids = torch.randint(
        3, model.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(5)
    )
    _, none = _grads(model, ids)
    checkpoint_layers(model, fam, 2)
    flags = [layer.gradient_checkpointing for layer in model.get_base_model().model.layers]
    assert flags == [True, True, False]
    _, partial = _grads(model, ids)
    for n in none:
        torch.testing.assert_close(partial[n], none[n], msg=n)


def test_recomputation_replays_the_host_values_its_forward_read() -> None:
    from torch.utils.checkpoint import checkpoint

    reads: list[int] = []

    def host_value() -> int:  # stands in for a device-to-host read; differs at every call
        reads.append(len(reads))
        return len(reads)

    def layer(x: torch.Tensor) -> torch.Tensor:
        n = same_in_recompute(host_value)
        m = same_in_recompute(host_value)
        return (x * n).sin() * m

    x = torch.randn(5, requires_grad=True)
    out = checkpoint(layer, x, use_reentrant=False, context_fn=recompute_contexts)
    out.sum().backward()
    assert reads == [0, 1]  # the forward's two reads; the recomputation read nothing
    # the gradient is the one of the forward's values (n = 1, m = 2), not of fresh reads
    expected = 2 * torch.cos(x.detach()) * 1
    torch.testing.assert_close(x.grad, expected)
    assert same_in_recompute(host_value) == 3  # outside a checkpointed layer: plain calls


def test_checkpointed_decoder_layers_replay_host_values_in_recompute() -> None:
    fam = FAMILIES["qwen3_moe"]
    model = _lora_model("qwen3_moe")
    layers = model.get_base_model().model.layers
    reads: list[int] = []
    for layer in layers:
        block = layer.mlp
        forward = block.forward

        def counted(*args: object, _forward=forward, **kwargs: object) -> object:
            same_in_recompute(lambda: reads.append(1))
            return _forward(*args, **kwargs)

        block.forward = counted
    checkpoint_layers(model, fam, len(layers))
    model.train()
    ids = torch.randint(
        3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1)
    )
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert len(reads) == len(layers)  # one per layer's forward, none in the recomputations


def test_checkpoint_plan_recomputes_only_what_does_not_fit() -> None:
    gib = 2**30
    # 48 layers of 1 GiB (one row: 1/16 GiB per layer x 16 rows), inputs 0.1 GiB a layer
    kw = {
        "layers": 48,
        "measured_bytes_one_row": 3 * gib,
        "rows": 16,
        "input_bytes_per_layer": gib // 10,
    }
    assert plan_checkpointing(**kw, budget_bytes=60 * gib).checkpointed == 0
    plan = plan_checkpointing(**kw, budget_bytes=30 * gib)
    # 48 - n full layers + n inputs <= 30 GiB  ->  n >= 18 / 0.9 = 20
    assert plan.checkpointed == 20
    assert plan_checkpointing(**kw, budget_bytes=gib).checkpointed == 48
    assert "may not fit" in plan_checkpointing(**kw, budget_bytes=gib).reason


def test_memory_plan_names_the_arithmetic_when_it_cannot_fit() -> None:
    from emmoe_dist.config import AdapterConfig

    fam = FAMILIES["qwen3_moe"]
    config = {
        "hidden_size": 2048,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
        "intermediate_size": 6144,
        "vocab_size": 151936,
        "mlp_only_layers": [],
        "decoder_sparse_step": 1,
    }
    counts = ParamCounts.from_config(config, fam, AdapterConfig(rank=8))
    assert 28e9 < counts.experts < 30e9  # Qwen3-30B-A3B: 29 B expert parameters
    assert 1.2e9 < counts.dense < 1.8e9
    common = {
        "stage": 2,
        "nf4": False,
        "tokens_per_micro_batch": 8192,
        "hidden": 2048,
        "layers": 48,
    }
    one = plan_memory(counts, world_size=1, ep_size=1, capacity_bytes=48 * 2**30, **common)
    problem = one.problem()
    assert problem is not None and "GiB per GPU" in problem and "48.0 GiB" in problem
    eight = plan_memory(counts, world_size=8, ep_size=8, capacity_bytes=48 * 2**30, **common)
    assert eight.problem() is None
    assert eight.weight_bytes < one.weight_bytes / 5


def test_profile_categories() -> None:
    lora = frozenset({8})
    assert (
        classify(
            "aten::_grouped_mm", [[4096, 2048], [128, 2048, 1536]], "", lora_dims=lora, vocab=None
        )
        == "expert GEMMs"
    )
    assert (
        classify(
            "aten::_grouped_mm", [[4096, 2048], [128, 2048, 8]], "", lora_dims=lora, vocab=None
        )
        == "LoRA matmuls"
    )
    assert (
        classify("aten::mm", [[8192, 2048], [2048, 151936]], "", lora_dims=lora, vocab=151936)
        == "LM head + loss"
    )
    assert classify("aten::sort", [[65536]], "", lora_dims=lora, vocab=None) == "permute/sort"
    assert (
        classify("aten::_flash_attention_forward", [], "", lora_dims=lora, vocab=None)
        == "attention"
    )
    assert (
        classify("aten::add_", [], "Optimizer.step#AdamW.step", lora_dims=lora, vocab=None)
        == "optimizer"
    )
    assert classify("aten::mul", [], "", lora_dims=lora, vocab=None) == "elementwise/norm/copy"


def test_cost_model_counts_the_bytes_each_plan_moves() -> None:
    from emmoe_dist.parallel.cost_model import (
        ModelShape,
        ParallelShape,
        predict,
        remote_ranks_per_token,
    )

    assert remote_ranks_per_token(1, 8) == 0.0
    # top-2 over 2 ranks: the other rank holds one of a token's experts with 1 - (1/2)^2
    assert remote_ranks_per_token(2, 2) == pytest.approx(0.75)
    model = ModelShape(
        hidden=2048, moe_layers=48, layers=48, top_k=8, trainable_params=0, dense_params=10**9
    )
    one = predict(10_000, 8192, model, ParallelShape(1, 8, 1, 2))
    assert one.comm_s == 0.0 and one.tok_s_per_gpu_exposed == pytest.approx(10_000)
    two = predict(10_000, 8192, model, ParallelShape(2, 8, 2, 2))
    # 4 trips per layer x 48 layers x 8192 tokens x 0.996 remote ranks x 4096 bytes
    expected = 4 * 48 * 8192 * remote_ranks_per_token(2, 8) * 2048 * 2
    assert two.bytes_per_step == pytest.approx(expected)
    assert two.tok_s_per_gpu_exposed < 10_000 == pytest.approx(two.tok_s_per_gpu_overlapped)
    across = predict(10_000, 8192, model, ParallelShape(16, 8, 16, 2))
    assert across.comm_s > predict(10_000, 8192, model, ParallelShape(8, 8, 8, 2)).comm_s * 2
    zero3 = predict(10_000, 8192, model, ParallelShape(2, 8, 1, 3))
    assert zero3.bytes_per_step == pytest.approx(2.0 * 10**9 * 0.5 * 2)
