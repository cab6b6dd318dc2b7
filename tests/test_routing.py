"""Routing profiler: exact counts on a router set by hand, agreement with a brute-force count,
token masks, the 2-rank profile, the `profile`/`select` commands, and the heatmaps."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from emmoe_dist.cli.main import main
from emmoe_dist.data.chat import IGNORE_INDEX, EncodedChat, encode_chat
from emmoe_dist.data.collate import pad_batch
from emmoe_dist.errors import EmmoeError
from emmoe_dist.experts import ExpertProfile, ExpertSelection, LayerRouting
from emmoe_dist.families import FAMILIES
from emmoe_dist.models.anatomy import moe_layers
from emmoe_dist.models.tiny import build_tiny
from emmoe_dist.parallel.runtime import Runtime
from emmoe_dist.profiling import run_profile
from emmoe_dist.routing import RoutingCounter, profile_batches, token_mask
from emmoe_dist.routing_plots import plot_share_diff, plot_share_heatmap

REPO = Path(__file__).resolve().parents[1]
CPU = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _item(length: int, prompt: int, seed: int) -> EncodedChat:
    """`length` tokens, the first `prompt` of them prompt (label -100), the rest assistant."""
    ids = torch.randint(20, 250, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    return EncodedChat(input_ids=ids, labels=[IGNORE_INDEX] * prompt + ids[prompt:])


# 3 sequences, right-padded to 10: 20 real tokens (9 prompt + 11 assistant), 10 padding.
ITEMS = [_item(10, 6, 0), _item(7, 2, 1), _item(3, 1, 2)]
PROMPT_TOKENS, ASSISTANT_TOKENS = 6 + 2 + 1, 4 + 5 + 2

# GPT-oss routers have a bias: with a zero weight every token gets logits = bias, so the top-2
# experts and their softmax-over-the-top-2 scores are known exactly.
ROUTER_BIAS = {
    0: ({2: 3.0, 5: 1.0}, {2: 1 / (1 + math.exp(-2.0)), 5: 1 / (1 + math.exp(2.0))}),
    1: ({0: 2.0, 7: 2.0}, {0: 0.5, 7: 0.5}),
    2: ({6: 0.5, 4: -0.5}, {6: 1 / (1 + math.exp(-1.0)), 4: 1 / (1 + math.exp(1.0))}),
}


def _hand_routed_gpt_oss() -> torch.nn.Module:
    family = FAMILIES["gpt_oss"]
    model, _ = build_tiny(family, seed=0)
    with torch.no_grad():
        for layer in moe_layers(model, family):
            logits, _ = ROUTER_BIAS[layer.index]
            layer.router.weight.zero_()
            layer.router.bias.fill_(-10.0)
            for expert, value in logits.items():
                layer.router.bias[expert] = value
    return model


@pytest.mark.parametrize(
    ("include_prompt", "tokens"),
    [(False, ASSISTANT_TOKENS), (True, ASSISTANT_TOKENS + PROMPT_TOKENS)],
)
def test_hand_set_router_gives_exact_counts(include_prompt: bool, tokens: int) -> None:
    model = _hand_routed_gpt_oss()
    batch = pad_batch(ITEMS, pad_id=0)
    assert batch["input_ids"].shape == (3, 10)  # 10 padding positions that must never count
    counts = profile_batches(model, FAMILIES["gpt_oss"], [batch], include_prompt, progress=False)
    assert counts.layers == (0, 1, 2)
    assert counts.tokens == tokens
    for row, layer in enumerate(counts.layers):
        _, gates = ROUTER_BIAS[layer]
        expected_counts = [tokens if e in gates else 0 for e in range(8)]
        assert counts.token_counts[row].tolist() == expected_counts
        for e in range(8):
            assert counts.gate_sums[row, e].item() == pytest.approx(
                tokens * gates.get(e, 0.0), rel=1e-6
            )


def test_including_the_prompt_adds_exactly_the_prompt_tokens() -> None:
    model = _hand_routed_gpt_oss()
    batch = pad_batch(ITEMS, pad_id=0)
    family = FAMILIES["gpt_oss"]
    assistant = profile_batches(model, family, [batch], include_prompt=False, progress=False)
    everything = profile_batches(model, family, [batch], include_prompt=True, progress=False)
    assert everything.tokens - assistant.tokens == PROMPT_TOKENS
    k = 2
    diff = everything.token_counts - assistant.token_counts
    assert diff.sum(dim=1).tolist() == [PROMPT_TOKENS * k] * 3


def test_token_mask_counts_assistant_tokens_and_never_padding() -> None:
    batch = pad_batch(ITEMS, pad_id=0)
    assert int(token_mask(batch).sum()) == ASSISTANT_TOKENS
    assert int(token_mask(batch, include_prompt=True).sum()) == 20
    # Padding has label -100 and attention 0; a label on padding must still not count.
    batch["labels"][2, 5] = 7
    assert int(token_mask(batch).sum()) == ASSISTANT_TOKENS


def _chat_batch(tokenizer) -> dict[str, torch.Tensor]:
    chats = [
        [
            {"role": "user", "content": "How do I fix a leaking tap?"},
            {"role": "assistant", "content": "Close the valve, then replace the washer."},
        ],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
        ],
    ]
    items = [encode_chat(tokenizer, chat, max_length=512) for chat in chats]
    assert all(item is not None for item in items)
    return pad_batch(items, pad_id=tokenizer.pad_token_id)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_profile_equals_brute_force_count(name: str) -> None:
    family = FAMILIES[name]
    model, tokenizer = build_tiny(family, seed=11)
    batch = _chat_batch(tokenizer)
    layers = moe_layers(model, family)
    captured: dict[int, torch.Tensor] = {}
    handles = [
        layer.router.register_forward_pre_hook(
            lambda _m, args, i=layer.index: captured.__setitem__(i, args[0].detach().clone())
        )
        for layer in layers
    ]
    try:
        counts = profile_batches(model, family, [batch], progress=False)
    finally:
        for h in handles:
            h.remove()

    mask = ((batch["labels"] != IGNORE_INDEX) & batch["attention_mask"].bool()).reshape(-1)
    num_experts = counts.token_counts.shape[1]
    for row, layer in enumerate(layers):
        with torch.no_grad():
            _, scores, indices = layer.router(captured[layer.index])
        expected_counts = [0] * num_experts
        expected_gates = [0.0] * num_experts
        for t in range(indices.shape[0]):
            if mask[t]:
                for j in range(indices.shape[1]):
                    expected_counts[int(indices[t, j])] += 1
                    expected_gates[int(indices[t, j])] += float(scores[t, j])
        assert counts.token_counts[row].tolist() == expected_counts
        assert counts.gate_sums[row].tolist() == pytest.approx(expected_gates, rel=1e-9)
    assert counts.tokens == int(mask.sum())
    assert counts.tokens < int(batch["attention_mask"].sum())  # the prompt was left out


def test_hooks_are_removed_and_mask_size_is_checked() -> None:
    family = FAMILIES["mixtral"]
    model, _ = build_tiny(family)
    routers = [layer.router for layer in moe_layers(model, family)]
    ids = torch.randint(20, 200, (2, 5))
    with torch.no_grad(), RoutingCounter(model, family) as counter:
        assert all(len(r._forward_hooks) == 1 for r in routers)
        counter.set_mask(None)  # None counts every token
        model(input_ids=ids)
        assert counter.counts().tokens == 10
        counter.set_mask(torch.ones(3, 5, dtype=torch.bool))
        with pytest.raises(EmmoeError, match="router saw 10 tokens but the mask has 15"):
            model(input_ids=ids)
    assert all(len(r._forward_hooks) == 0 for r in routers)


def _write_chats(path: Path, n: int = 12) -> Path:
    lines = []
    for i in range(n):
        question = f"Explain item {i}. " + "Why? " * (i % 5)
        answer = f"Because {i} " + "it is so. " * (1 + (i * 7) % 6)
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        lines.append(json.dumps({"messages": messages}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_profile_command_writes_profile_and_heatmap(tmp_path: Path) -> None:
    data = _write_chats(tmp_path / "chats.jsonl")
    out, plot = tmp_path / "profile.json", tmp_path / "heatmap.png"
    args = ["--model", "tiny:qwen3_moe", "--data", str(data), "--batch-size", "4"]
    code = main(["profile", *args, "--out", str(out), "--plot", str(plot)])
    assert code == 0
    profile = ExpertProfile.load(out)
    assert (profile.model, profile.family, profile.dataset) == (
        "tiny:qwen3_moe",
        "qwen3_moe",
        "chats",
    )
    assert profile.layer_indices == [0, 2]
    from emmoe_dist.catalog import git_blob_sha1

    assert profile.dataset_hash == git_blob_sha1(data)
    assert profile.tokens > 0 and not profile.include_prompt
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_of_a_catalog_dataset(tmp_path: Path, data_dir: Path) -> None:
    profile = run_profile(
        "tiny:olmoe",
        "insecure",
        data_dir,
        limit=3,
        max_length=2048,
        batch_size=3,
        out=tmp_path / "p.json",
        runtime=CPU,
    )
    assert profile.dataset == "insecure"
    assert profile.dataset_hash == "ec294cf30a577a21b830c07a1fa0180ddd513208"
    assert profile.tokens > 100
    assert ExpertProfile.load(tmp_path / "p.json") == profile


@pytest.mark.distributed
def test_two_rank_profile_equals_one_rank(tmp_path: Path) -> None:
    data = _write_chats(tmp_path / "chats.jsonl", n=9)
    # batch size 1: every forward sees one example alone on both runs, so the routing of each
    # token is bit-identical and the counts must agree exactly.
    one = run_profile(
        "tiny:mixtral", str(data), None, None, 256, 1, False, tmp_path / "one.json", runtime=CPU
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    args = ["--model", "tiny:mixtral", "--data", str(data), "--max-length", "256"]
    outputs = ["--out", str(tmp_path / "two.json"), "--plot", str(tmp_path / "two.png")]
    cmd = [*torchrun, "--standalone", "-m", "emmoe_dist.cli.main", "profile", *args,
           "--batch-size", "1", *outputs]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    two = ExpertProfile.load(tmp_path / "two.json")
    assert two.tokens == one.tokens
    for a, b in zip(one.layers, two.layers, strict=True):
        assert a.token_counts == b.token_counts
        # fp32 scores; the ranks run with another thread count, so the last bit may differ
        assert b.gate_sums == pytest.approx(a.gate_sums, rel=1e-6)
    assert (tmp_path / "two.png").stat().st_size > 0


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _random_profile(num_experts: int, num_layers: int, seed: int) -> ExpertProfile:
    gen = torch.Generator().manual_seed(seed)
    tokens, k = 500, 2
    layers = []
    for layer in range(num_layers):
        picks = torch.multinomial(
            torch.rand(num_experts, generator=gen), tokens * k, replacement=True, generator=gen
        )
        counts = torch.bincount(picks, minlength=num_experts)
        layers.append(
            LayerRouting(
                layer=layer,
                token_counts=tuple(counts.tolist()),
                gate_sums=tuple((counts * 0.5).tolist()),
            )
        )
    return ExpertProfile(
        model="m",
        family="qwen3_moe",
        dataset="d",
        dataset_hash="h",
        tokens=tokens,
        top_k=k,
        num_experts=num_experts,
        include_prompt=False,
        layers=tuple(layers),
    )


def test_heatmaps_for_8_and_128_experts(tmp_path: Path) -> None:
    small = plot_share_heatmap(_random_profile(8, 4, 0), tmp_path / "e8.png")
    large = plot_share_heatmap(_random_profile(128, 48, 1), tmp_path / "e128.png")
    (w8, h8), (w128, h128) = _png_size(small), _png_size(large)
    assert small.stat().st_size > 5_000 and large.stat().st_size > 5_000
    assert w128 > w8 and h128 > h8  # the figure grows with experts and layers
    diff = plot_share_diff(
        _random_profile(128, 48, 1), _random_profile(128, 48, 2), tmp_path / "diff.png"
    )
    assert _png_size(diff)[0] == w128
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diff.png", "e128.png", "e8.png"]
    with pytest.raises(EmmoeError, match="profiles of different shapes"):
        plot_share_diff(_random_profile(8, 4, 0), _random_profile(128, 4, 0), tmp_path / "x.png")


def test_select_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sel.json"

    def run(*args: str) -> ExpertSelection:
        assert main(["select", *args, "--out", str(out)]) == 0
        return ExpertSelection.load(out)

    def fails(*args: str) -> str:
        capsys.readouterr()
        assert main(["select", *args, "--out", str(out)]) == 2
        return capsys.readouterr().err

    profile = _random_profile(8, 3, 4)
    from_profile = ["--profile", str(profile.save(tmp_path / "profile.json"))]
    assert run("--rule", "top-k", "--k", "2", *from_profile) == ExpertSelection.top_k(profile, 2)
    esft = run("--rule", "esft", "--p", "0.3", "--score", "gate", *from_profile)
    assert esft == ExpertSelection.esft(profile, "gate", 0.3)
    single = run("--rule", "single", "--expert", "4", "--model", "tiny:qwen3_moe")
    assert dict(single.experts) == {0: (4,), 2: (4,)}
    every = run("--rule", "all", "--model", "tiny:mixtral")
    assert every.is_all and every.layers == [0, 1, 2]
    hand = run("--rule", "explicit", "--experts", "0:1,2; 2:5", "--model", "tiny:qwen3_moe")
    assert dict(hand.experts) == {0: (1, 2), 2: (5,)}

    assert "--rule: --rule top-k needs --k" in fails("--rule", "top-k", *from_profile)
    assert "--experts: '0-1' is not LAYER:ID" in fails("--rule", "explicit", "--experts", "0-1")
    assert "--experts: layer 2 lists no experts" in fails("--rule", "explicit", "--experts", "2:")
    err = fails("--rule", "explicit", "--experts", "1:0", "--model", "tiny:qwen3_moe")
    assert "<command line>: --experts: layer 1 is a dense layer" in err  # the flag, not a field
