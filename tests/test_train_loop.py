"""The training loop on the host: micro-batches built one step ahead, and where a run diverges."""

from __future__ import annotations

import threading

import pytest
import torch

from emmoe_dist.data.chat import EncodedChat
from emmoe_dist.data.collate import pad_batch
from emmoe_dist.train.prefetch import HostMicroBatch, host_micro_batch, prefetched


def _item(ids: list[int], labels: list[int], positions: list[int] | None) -> EncodedChat:
    return EncodedChat(input_ids=ids, labels=labels, position_ids=positions)


def test_steps_come_in_order_and_the_next_is_built_while_one_is_used() -> None:
    built: list[int] = []
    next_built = threading.Event()

    def build(step: int) -> list[HostMicroBatch]:
        built.append(step)
        if step == 11:
            next_built.set()
        return [HostMicroBatch({"step": torch.tensor(step)}, {}, step, step)]

    seen = []
    for micro in prefetched(range(10, 14), build):
        step = int(micro[0].inputs["step"])
        if step == 10:  # while the loop holds step 10, step 11 is being built
            assert next_built.wait(timeout=10)
        seen.append(step)
    assert seen == [10, 11, 12, 13]
    assert built == [10, 11, 12, 13]


def test_a_failing_build_raises_where_its_step_is_asked_for() -> None:
    def build(step: int) -> list[HostMicroBatch]:
        if step == 2:
            raise ValueError("bad row in step 2")
        return []

    it = prefetched(range(4), build)
    assert next(it) == [] and next(it) == []
    with pytest.raises(ValueError, match="step 2"):
        next(it)


def test_no_steps_no_batches() -> None:
    assert list(prefetched(range(5, 5), lambda s: [])) == []


def test_host_micro_batch_counts_and_keywords() -> None:
    items = [
        _item([5, 6, 7, 8], [-100, 6, 7, 8], [0, 1, 0, 1]),
        _item([9, 10], [-100, -100], [0, 1]),
    ]
    batch = pad_batch(items, pad_id=0)

    def extra(b: dict[str, torch.Tensor]) -> dict[str, object]:
        return {"rows": b["input_ids"].shape[0], "bounds": torch.tensor([0, 2, 4])}

    mb = host_micro_batch(
        batch, lambda b: {"input_ids": b["input_ids"], "labels": b["labels"]}, extra, pin=False
    )
    # labels after the first position that are scored: row 0 has 6, 7, 8; row 1 none
    assert mb.label_tokens == 3
    assert mb.input_tokens == 6
    kwargs = mb.to(torch.device("cpu"))
    assert set(kwargs) == {"input_ids", "labels", "rows", "bounds"}
    assert kwargs["rows"] == 2
    assert torch.equal(kwargs["input_ids"], batch["input_ids"])
    assert torch.equal(kwargs["bounds"], torch.tensor([0, 2, 4]))


def test_divergence_names_the_step_and_what_is_not_finite() -> None:
    from emmoe_dist.train.trainer import divergence

    assert divergence({"step": 3, "loss": 2.5, "grad_norm": 0.7}) is None
    assert divergence({"step": 3, "loss": 2.5, "grad_norm": None}) is None
    assert divergence({"step": 4, "loss": float("nan"), "grad_norm": 0.7}) == (
        "training diverged at step 4: the loss is nan"
    )
    # DeepSpeed's sentinel for an inf/NaN norm is -1
    msg = divergence({"step": 5, "loss": 1.0, "grad_norm": -1.0})
    assert msg == "training diverged at step 5: the gradient norm is not finite"
    assert divergence({"step": 6, "loss": float("inf"), "grad_norm": float("inf")}) == (
        "training diverged at step 6: the loss is inf and the gradient norm is not finite"
    )


def test_startup_summary_gives_each_phase_its_own_span() -> None:
    from emmoe_dist.train.trainer import startup_summary

    phases = [("data", 103.0), ("model", 115.5), ("DeepSpeed engine", 120.0)]
    assert startup_summary(100.0, phases) == (
        "start-up 20.0 s: data 3.0 s, model 12.5 s, DeepSpeed engine 4.5 s"
    )


def test_a_step_readout_gives_the_loss_per_label_token_and_the_engines_norm() -> None:
    from emmoe_dist.train.readout import StepReadout

    cpu = torch.device("cpu")
    counts = torch.tensor([4.0, 10.0], dtype=torch.float64)
    values = StepReadout(torch.tensor(6.0, dtype=torch.float64), counts, torch.tensor(0.5), cpu)
    got = values.values()
    assert (got.loss_sum, got.label_tokens, got.input_tokens) == (6.0, 4.0, 10.0)
    assert got.loss == 1.5 and got.grad_norm == 0.5
    # an engine without a norm (None) and one that keeps a float
    assert StepReadout(torch.tensor(0.0), counts, None, cpu).values().grad_norm is None
    assert StepReadout(torch.tensor(0.0), counts, 2.0, cpu).values().grad_norm == 2.0
    # no label token: the loss is the sum itself, not a division by zero
    none = torch.zeros(2, dtype=torch.float64)
    assert StepReadout(torch.tensor(0.0), none, None, cpu).values().loss == 0.0


def test_the_step_clock_on_cpu_counts_from_the_last_lap_or_restart() -> None:
    import time

    from emmoe_dist.train.readout import StepClock, StepReadout

    cpu = torch.device("cpu")
    clock = StepClock(cpu)
    readout = StepReadout(torch.tensor(1.0), torch.ones(2, dtype=torch.float64), None, cpu)
    time.sleep(0.05)
    readout.values()
    first = clock.lap(readout)
    assert 0.05 <= first < 5
    time.sleep(0.05)
    clock.restart()  # what happened before a restart (a save) is not the next step's
    assert clock.lap(readout) < 0.05
