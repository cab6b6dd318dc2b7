"""The fine-tuning workflow: load -> select experts -> (quantize) -> adapter -> DeepSpeed -> loop.

The transformations are applied in one order, for these reasons:
1. load the model (router auxiliary loss off, so only the language-model loss trains);
2. quantize to NF4 (QLoRA) before adapters, so LoRA wraps the 4-bit storage; or, for
   quantization-aware LoRA (`train.qat: mxfp4`), fake-quantize the frozen experts to their
   MXFP4 values before adapters read them (the base is frozen: once is every forward);
3. adapter: LoRA (unchosen experts' factors zeroed) or trainable expert deltas;
   then expert parallelism, when the DeepSpeed config asks for it: it adopts the adapters'
   expert modules and cuts the frozen experts to this rank's share;
4. input grads: every expert-subset run has its only trainable tensors inside MoE blocks,
   and ZeRO-3 then needs `enable_input_require_grads`;
5. fast paths (train/fast_paths.py) and the loss module around the model, then activation
   checkpointing sized by a measured forward of the model as it will train;
6. the DeepSpeed engine last, because it partitions whatever parameters exist at that point.

The router never trains, and a run whose router digest changed fails, except in the
router-training arm (`adapter.train_router`): that run profiles routing on the same training
examples before the first step and after the last, and records how it moved
(`routing_before.json`, `routing_after.json`, `routing_change.json`, the manifest's `router`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from emmoe_dist import run_folder as rf
from emmoe_dist.adapters.expert_delta import apply_expert_delta, delta_state_dict, save_expert_delta
from emmoe_dist.adapters.lora import (
    adapter_state_dict,
    apply_lora,
    assert_router_frozen,
    lora_config,
    router_full,
    save_peft_adapter,
    unselected_expert_max,
)
from emmoe_dist.config import ExperimentConfig, dump_config, mxfp4_family_problem
from emmoe_dist.errors import EmmoeError, InputError
from emmoe_dist.experts import ExpertSelection
from emmoe_dist.families import MoEFamily
from emmoe_dist.files import replace_dir
from emmoe_dist.models.anatomy import decoder_layers, model_config
from emmoe_dist.models.causal_loss import CausalLMLoss
from emmoe_dist.models.checkpointing import (
    GIB,
    CheckpointPlan,
    checkpoint_layers,
    measure_activation_bytes,
    plan_checkpointing,
)
from emmoe_dist.parallel.ds_config import (
    ExpertParallelConfig,
    complete_ds_config,
    expert_parallel_config,
    read_ds_config,
    zero_stage,
)
from emmoe_dist.parallel.expert_parallel import apply_expert_parallel, local_world_size
from emmoe_dist.parallel.memory_plan import ParamCounts, plan_memory
from emmoe_dist.parallel.runtime import Runtime, barrier
from emmoe_dist.parallel.strategy import DeepSpeedStrategy
from emmoe_dist.parallel.zero_init import partitioned_loading, resident_elements
from emmoe_dist.tracking import make_tracker, replay_history
from emmoe_dist.train import artifacts as art
from emmoe_dist.train.batches import BatchPlan
from emmoe_dist.train.fast_paths import FastPaths, apply_fast_paths
from emmoe_dist.train.monitor import TrainingMonitor
from emmoe_dist.train.prefetch import HostMicroBatch, host_micro_batch, prefetched
from emmoe_dist.train.preflight import Finished, prepare, record_identity
from emmoe_dist.train.readout import StepClock, StepReadout, StepValues
from emmoe_dist.train.step_profile import profile_step, write_profile

if TYPE_CHECKING:
    from emmoe_dist.adapters.qlora import WeightMemory
    from emmoe_dist.interp.monitor import ProbeSet


@dataclass(frozen=True)
class TrainResult:
    output_dir: Path
    steps: int
    final_loss: float
    artifact: Path  # the adapter or expert-delta folder
    model: nn.Module | None = None  # the trained module, still sharded as DeepSpeed holds it


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _router_digest(model: nn.Module, family: MoEFamily, strategy: DeepSpeedStrategy | None) -> str:
    marker = f".{family.router_path}."
    named = [(n, p) for n, p in model.named_parameters() if marker in n]
    if strategy is None:
        return art.tensor_digest(named)
    with strategy.gathered([p for _, p in named]):
        return art.tensor_digest(named)


@dataclass(frozen=True)
class LoadInfo:
    partitioned: bool  # loaded straight into ZeRO-3 partitions (parallel/zero_init.py)
    resident_elements: int  # parameter elements this rank held once the checkpoint was in
    ep_size: int = 1  # resolved expert-parallel group size
    qat_changed: int | None = None  # expert weights MXFP4 fake quantization moved (train.qat)


def _experts_on_mxfp4_grid(cfg: ExperimentConfig, hf_config: dict[str, Any]) -> bool:
    """Whether the experts load already as MXFP4 values: an MXFP4 checkpoint's weights, not
    `model.init: random` on its config."""
    from emmoe_dist.adapters.mxfp4_export import is_mxfp4_config

    return is_mxfp4_config(hf_config) and cfg.model.init == "checkpoint"


def _ep_size(
    ep: ExpertParallelConfig, family: MoEFamily, hf_config: dict[str, Any], rt: Runtime
) -> int:
    from emmoe_dist.families import num_experts

    return ep.resolve(
        num_experts=num_experts(family, hf_config),
        local_world_size=local_world_size(rt.world_size),
    )


def _build_model(
    cfg: ExperimentConfig,
    rt: Runtime,
    out: Path,
    ep: ExpertParallelConfig | None,
    partition_with: dict[str, Any] | None,
    family: MoEFamily,
    hf_config: dict[str, Any],
    selection: ExpertSelection,
) -> tuple[nn.Module, Any, WeightMemory | None, LoadInfo]:
    """The model with its adapters; `partition_with` (a ZeRO-3 config) loads the checkpoint
    straight into partitions instead of whole onto every rank's device."""
    from emmoe_dist.models.loading import load_model

    if partition_with is not None:
        with partitioned_loading(partition_with):
            loaded = load_model(cfg.model, seed=cfg.seed, for_training=True)
    else:
        # Expert parallelism cuts each rank's experts from the whole tensors: a checkpoint is
        # read into host memory first and only this rank's share moves to its device (below).
        # A group of one (ep_size auto on one GPU per node) cuts nothing: straight to the device.
        split = ep is not None and _ep_size(ep, family, hf_config, rt) > 1
        on_host = split and not cfg.model.is_tiny
        device = None if on_host else rt.device
        loaded = load_model(cfg.model, seed=cfg.seed, device=device, for_training=True)
    model: Any = loaded.model  # an HF model, later PEFT-wrapped: HF methods are used below
    tokenizer = loaded.tokenizer
    if cfg.model.is_tiny and rt.is_main:
        # A tiny base is built, not loaded: keep it so the adapter has a base to load onto.
        tmp = out / f".{rf.BASE_DIR}.tmp"
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        replace_dir(tmp, out / rf.BASE_DIR)
    qat_changed = None
    if cfg.train.qat == "mxfp4":
        from emmoe_dist.adapters.mxfp4 import fake_quantize_experts

        # The dequantized experts of an MXFP4 checkpoint are fixed points of the fake
        # quantization: skipping it there is exact (and the only way under ZeRO-3 partitions).
        on_grid = _experts_on_mxfp4_grid(cfg, hf_config)
        qat_changed = 0 if on_grid else fake_quantize_experts(model, family)
        if rt.is_main:
            print(f"[emmoe] QAT: {qat_changed} expert weights moved to MXFP4 values", flush=True)
    load_info = LoadInfo(
        partition_with is not None, resident_elements(loaded.model), qat_changed=qat_changed
    )
    memory = None
    if cfg.adapter.quantize == "nf4":
        from emmoe_dist.adapters.qlora import (
            quantize_experts_nf4,
            quantize_linear_nf4,
            weight_memory,
        )

        quantize_linear_nf4(model, family)
        quantize_experts_nf4(model, family)
        memory = weight_memory(model)
        if rt.is_main:
            print(f"[emmoe] NF4 {memory}", flush=True)
    if cfg.adapter.mode == "lora":
        model = apply_lora(model, family, cfg.adapter, selection)
    else:
        apply_expert_delta(model, family, selection)
    if not cfg.adapter.train_router:
        assert_router_frozen(model, family)
    if ep is not None:
        layout = apply_expert_parallel(model, family, ep)
        load_info = dataclasses.replace(load_info, ep_size=layout.ep_size)
    model.enable_input_require_grads()
    model = model.to(rt.device)
    return model, tokenizer, memory, load_info


def _finished(out: Path, manifest: rf.RunManifest, rt: Runtime) -> TrainResult:
    """A re-run of a finished run: nothing is trained, nothing is written."""
    if rt.is_main:
        print(
            f"[emmoe] {out} holds this experiment's finished run (completed "
            f"{manifest.completed_at or 'earlier'}); nothing to do",
            flush=True,
        )
    loss = manifest.final_loss if manifest.final_loss is not None else float("nan")
    return TrainResult(out, manifest.steps or 0, loss, out / manifest.artifact)


def wandb_run_id(out: Path, identity: dict[str, Any]) -> str:
    """One W&B run per run folder and experiment: a resumed run logs to the run it started."""
    import hashlib

    key = json.dumps({"folder": str(out.resolve()), "identity": identity}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def startup_summary(started: float, phases: list[tuple[str, float]]) -> str:
    """`start-up 41.2 s: data 3.1 s, model 12.0 s, ...` from the end time of each phase (the
    first step's compilation is in that step's `step_time_s`)."""
    parts, last = [], started
    for name, end in phases:
        parts.append(f"{name} {end - last:.1f} s")
        last = end
    return f"start-up {last - started:.1f} s: " + ", ".join(parts)


def divergence(row: dict[str, Any]) -> str | None:
    """Why the step in `row` (a metrics row) diverged, or None.

    DeepSpeed's bf16 plans do not scan gradients for inf/NaN before stepping (a per-tensor
    scan that costs more host time than the step's optimizer; bf16 has fp32's range, so the
    scan exists for fp16 overflow), so a non-finite gradient reaches the weights: the run
    stops here, at the first such step, rather than training on."""
    bad = []
    loss, norm = row.get("loss"), row.get("grad_norm")
    if isinstance(loss, float) and not math.isfinite(loss):
        bad.append(f"the loss is {loss}")
    # DeepSpeed reports an inf/NaN norm as -1: no norm is negative
    if isinstance(norm, float) and not (math.isfinite(norm) and norm >= 0):
        bad.append("the gradient norm is not finite")
    return f"training diverged at step {row['step']}: {' and '.join(bad)}" if bad else None


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Packed batches carry position ids that restart per example; the attention then keeps
    examples apart by their segments, which needs no attention mask (models/packed_attention.py)."""
    if "position_ids" in batch:
        return {
            "input_ids": batch["input_ids"],
            "labels": batch["labels"],
            "position_ids": batch["position_ids"],
        }
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "labels": batch["labels"],
    }


def _plan_checkpointing(
    cfg: ExperimentConfig,
    wrapper: CausalLMLoss,
    family: MoEFamily,
    sample: dict[str, torch.Tensor],
    fast: FastPaths,
    rt: Runtime,
) -> CheckpointPlan:
    """`train.gradient_checkpointing` as layers to recompute; `auto` measures on the GPU."""
    setting = cfg.train.gradient_checkpointing
    hf_layers = len(decoder_layers(wrapper.lm, family))
    hidden = int(model_config(wrapper.lm)["hidden_size"])
    input_bytes = cfg.train.micro_batch_size * sample["input_ids"].shape[1] * hidden * 2
    if setting is not True and (setting is False or rt.device.type != "cuda"):
        plan = CheckpointPlan(hf_layers, 0, 0, input_bytes, None, "not requested")
    elif setting is True:
        plan = CheckpointPlan(hf_layers, hf_layers, 0, input_bytes, None, "requested")
    else:
        inputs = {k: v.to(rt.device) for k, v in _model_inputs(sample).items()}
        inputs.update(fast.batch_kwargs(sample, rt.device))
        measured = measure_activation_bytes(lambda: wrapper(**inputs), rt.device)
        trainable = sum(p.numel() for p in wrapper.parameters() if p.requires_grad)
        total = torch.cuda.get_device_properties(rt.device).total_memory
        per_row_layer = measured // hf_layers
        reserve = 2 * GIB + 2 * per_row_layer * cfg.train.micro_batch_size
        budget = int(0.9 * total) - torch.cuda.memory_allocated(rt.device)
        budget -= 18 * trainable + reserve  # bf16 grads, fp32 master and AdamW moments
        plan = plan_checkpointing(
            layers=hf_layers,
            measured_bytes_one_row=measured,
            rows=cfg.train.micro_batch_size,
            input_bytes_per_layer=input_bytes,
            budget_bytes=max(0, budget),
        )
    checkpoint_layers(wrapper.lm, family, plan.checkpointed)
    return plan


def base_model_id(cfg: ExperimentConfig) -> str:
    """What an adapter loads onto: the saved tiny base, or the configured checkpoint."""
    if cfg.model.is_tiny:
        return str((Path(cfg.output_dir) / rf.BASE_DIR).resolve())
    return cfg.model.name_or_path


def _save_artifact(
    cfg: ExperimentConfig,
    module: nn.Module,
    family: MoEFamily,
    selection: ExpertSelection,
    strategy: DeepSpeedStrategy,
    rt: Runtime,
    out: Path,
) -> Path:
    """Gather the trained tensors (every rank takes part) and write them on rank 0."""
    if cfg.adapter.mode == "lora":
        trained = [p for p in module.parameters() if p.requires_grad]  # LoRA (and a router)
        with strategy.gathered(trained):
            leak = unselected_expert_max(module, selection)
            state = adapter_state_dict(module, family, router_weights=router_full(cfg.adapter))
        if leak != 0.0:
            raise EmmoeError(f"an unchosen expert's LoRA factor moved (max |value| {leak:g})")
        final = out / rf.ADAPTER_DIR
        if rt.is_main:
            tmp = out / f".{rf.ADAPTER_DIR}.tmp"
            save_peft_adapter(state, lora_config(family, cfg.adapter), tmp, base_model_id(cfg))
            selection.save(tmp / rf.SELECTION)
            replace_dir(tmp, final)
    else:
        deltas = [p for _, p in module.named_parameters() if p.requires_grad]
        with strategy.gathered(deltas):
            state = delta_state_dict(module)
        final = out / rf.DELTA_DIR
        if rt.is_main:
            tmp = out / f".{rf.DELTA_DIR}.tmp"
            save_expert_delta(state, tmp, {"family": family.name, "base": cfg.model.name_or_path})
            selection.save(tmp / rf.SELECTION)
            replace_dir(tmp, final)
    barrier()
    return final


def _save_snapshot(
    cfg: ExperimentConfig,
    module: nn.Module,
    family: MoEFamily,
    selection: ExpertSelection,
    strategy: DeepSpeedStrategy,
    rt: Runtime,
    out: Path,
    step: int,
    loss: float,
) -> None:
    """The adapter (or deltas) of this step under snapshots/, gathered like the final artifact
    (every rank takes part); `snapshot.json` is written last, so a folder without it is a
    snapshot a crash interrupted, redone when the run resumes."""
    folder = rf.snapshot_folder(out, step)
    artifact = _save_artifact(cfg, module, family, selection, strategy, rt, folder)
    if rt.is_main:
        rf.write_snapshot(
            folder,
            rf.SnapshotInfo(
                step=step,
                artifact="adapter" if artifact.name == rf.ADAPTER_DIR else "expert_delta",
                base_model=base_model_id(cfg),
                family=family.name,
                model_name=cfg.model.name_or_path,
                loss=None if math.isnan(loss) else loss,
            ),
        )
    barrier()


def _monitor(
    cfg: ExperimentConfig,
    probes: ProbeSet | None,
    lm: nn.Module,
    family: MoEFamily,
    fast: FastPaths,
    rt: Runtime,
    pad_id: int,
) -> TrainingMonitor | None:
    """The monitor of `train.monitor`: its probes go as packed rows where training attends over
    packed rows (varlen attention needs the segment boundaries), else as padded rows."""
    if probes is None or cfg.train.monitor is None:
        return None

    def packed(position_ids: torch.Tensor) -> dict[str, Any]:
        return fast.batch_kwargs({"position_ids": position_ids}, rt.device)

    return TrainingMonitor(
        probes=probes,
        model=lm,
        family=family,
        every=cfg.train.monitor.every,
        runtime=rt,
        pad_id=pad_id,
        packed_kwargs=packed if fast.attention == "varlen" else None,
    )


def _stop(cfg: ExperimentConfig, row: dict[str, Any], planned: int) -> rf.Stopped | None:
    """`train.stop_when` at this step: the rule holds for a value the step has (a monitor
    metric only has one on monitor steps). Every rank holds the same row values (losses and
    readings are all-reduced), so every rank stops at the same step."""
    rule = cfg.train.stop_when
    value = row.get(rule.metric) if rule is not None else None
    if rule is None or not isinstance(value, int | float) or not rule.holds(float(value)):
        return None
    return rf.Stopped(
        step=int(row["step"]), rule=rule.describe(), value=float(value), planned_steps=planned
    )


def _stopped_state(stopped: rf.Stopped | None) -> dict[str, Any] | None:
    return None if stopped is None else stopped.model_dump()


def _check_memory_plan(
    cfg: ExperimentConfig,
    raw_ds: dict[str, Any],
    ep: ExpertParallelConfig | None,
    family: MoEFamily,
    hf_config: dict[str, Any],
    rt: Runtime,
) -> None:
    """Print the plan's expected memory per GPU (rank 0) and stop before loading if it cannot
    fit (parallel/memory_plan.py)."""
    ep_size = 1 if ep is None else _ep_size(ep, family, hf_config, rt)
    capacity = None
    if rt.device.type == "cuda":
        capacity = torch.cuda.get_device_properties(rt.device).total_memory
    memory = plan_memory(
        ParamCounts.from_config(hf_config, family, cfg.adapter),
        stage=zero_stage(raw_ds),
        world_size=rt.world_size,
        ep_size=ep_size,
        nf4=cfg.adapter.quantize == "nf4",
        tokens_per_micro_batch=cfg.train.micro_batch_size * cfg.data.max_length,
        hidden=int(hf_config["hidden_size"]),
        layers=int(hf_config["num_hidden_layers"]),
        capacity_bytes=capacity,
    )
    if rt.is_main:
        print(memory.describe(), flush=True)
    problem = memory.problem()
    if problem is not None:
        raise EmmoeError(problem)


def _router_profile_items(cfg: ExperimentConfig, tokenizer: Any) -> list[Any]:
    """The first `train.router_profile_examples` training examples, unpacked: what routing is
    profiled on before and after a router-training run."""
    from emmoe_dist.data.training import encode_dataset, load_training_split

    split = load_training_split(
        cfg.data.train,
        cfg.data_dir(),
        heldout=cfg.data.heldout,
        seed=cfg.data.split_seed,
        limit=cfg.data.limit,
    )
    examples = split.train[: cfg.train.router_profile_examples]
    return encode_dataset(tokenizer, examples, cfg.data.max_length).items


def _routing_profile(
    model: nn.Module,
    family: MoEFamily,
    items: list[Any],
    pad_id: int,
    cfg: ExperimentConfig,
    rt: Runtime,
    *,
    when: str,
    data_hash: str,
) -> Any:
    """The routing profile (assistant tokens) of the model as it trains now. Every rank runs
    the same batches: under ZeRO-3 and expert parallelism a forward is collective."""
    from emmoe_dist.data.collate import pad_batch
    from emmoe_dist.routing import RoutingCounter, token_mask

    was_training = model.training
    model.eval()  # no jitter noise or dropout in the counted routing
    size = cfg.train.micro_batch_size
    try:
        with torch.no_grad(), RoutingCounter(model, family) as counter:
            for start in range(0, len(items), size):
                batch = pad_batch(items[start : start + size], pad_id)
                counter.set_mask(token_mask(batch))
                model(
                    input_ids=batch["input_ids"].to(rt.device),
                    attention_mask=batch["attention_mask"].to(rt.device),
                    use_cache=False,
                    logits_to_keep=1,
                )
    finally:
        model.train(was_training)
    return counter.counts().to_profile(
        model=f"{cfg.name} {when}",
        family=family.name,
        dataset=cfg.data.train,
        dataset_hash=f"{data_hash[:16]}:first{len(items)}",
        include_prompt=False,
    )


def _record_routing_change(
    before: Any, after: Any, selection: ExpertSelection, out: Path
) -> dict[str, float | int]:
    """Write the two profiles and their routing shift into the run folder; the summary."""
    from emmoe_dist.files import write_json_atomic
    from emmoe_dist.interp.routing_shift import routing_shift

    shift = routing_shift(before, after, trained=selection, permutations=1000)
    before.save(out / rf.ROUTING_BEFORE)
    after.save(out / rf.ROUTING_AFTER)
    write_json_atomic(out / rf.ROUTING_CHANGE, shift.to_json())
    kls = [layer.kl for layer in shift.layers]
    moved = [layer.total_variation for layer in shift.layers]
    return {
        "tokens": shift.tokens,
        "mean_kl": sum(kls) / len(kls),
        "max_kl": max(kls),
        "mean_total_variation": sum(moved) / len(moved),
    }


def run_training(
    cfg: ExperimentConfig,
    ds_config_path: str | Path,
    rt: Runtime,
    *,
    stop_after: int | None = None,
    observe: Callable[[int, nn.Module], None] | None = None,
) -> TrainResult:
    """Train as configured; resumes from `<output_dir>/checkpoints` when one exists, and does
    nothing when the folder holds this experiment's finished run (train/preflight.py checks
    that, the data and the selection before any model loads).

    `stop_after` ends the run after that many optimizer steps (a checkpoint is written
    first): tests use it to interrupt a run and resume it. `observe(step, model)` runs on every
    rank after each optimizer step, with the trained (possibly partitioned) model: tests read
    its logits at snapshot steps.
    """
    started = time.perf_counter()
    phases: list[tuple[str, float]] = []  # where start-up went: printed before the first step

    def phase(name: str) -> None:
        phases.append((name, time.perf_counter()))

    out = Path(cfg.output_dir)
    raw_ds = read_ds_config(ds_config_path)
    ep = expert_parallel_config(raw_ds, file=str(ds_config_path))
    if cfg.adapter.quantize == "nf4" and zero_stage(raw_ds) == 3:
        # Every rank holds the whole NF4 model; ZeRO-3 would re-partition its packed storage.
        raise InputError(
            "adapter.quantize: nf4 trains with ZeRO-0/1/2 (e.g. "
            "ds_configs/zero2_qlora.json), not ZeRO-3",
            file=str(ds_config_path),
            field="zero_optimization.stage",
        )
    from emmoe_dist.models.loading import resolve_dtype

    prepared = prepare(cfg, rt.world_size)
    if isinstance(prepared, Finished):
        return _finished(out, prepared.manifest, rt)
    family, hf_config, selection = prepared.family, prepared.hf_config, prepared.selection
    problem = mxfp4_family_problem(family.name) if cfg.train.qat == "mxfp4" else None
    if problem:
        raise InputError(problem, field="train.qat")
    if rt.device.type == "cpu":  # DeepSpeed would compile it silently on first use
        from emmoe_dist.parallel.cpu_ops import build_cpu_comm_op

        build_cpu_comm_op(say=lambda text: print(text, flush=True) if rt.is_main else None)
    out.mkdir(parents=True, exist_ok=True)
    if rt.is_main and prepared.dropped:
        print(
            f"[emmoe] {prepared.dropped} of {len(prepared.split.train)} examples had no "
            f"assistant token within max_length={cfg.data.max_length} and were left out",
            flush=True,
        )
    bf16 = rt.device.type == "cuda" and resolve_dtype(cfg.model.dtype, rt.device) == torch.bfloat16
    ds_cfg = complete_ds_config(
        raw_ds, file=str(ds_config_path), train=cfg.train, family=family, bf16=bf16
    )
    # A checkpoint under plain ZeRO-3 loads into partitions; tiny models are built whole (no
    # checkpoint), and expert parallelism cuts each rank's experts from the whole tensors.
    partitioned = zero_stage(raw_ds) == 3 and ep is None and not cfg.model.is_tiny
    if partitioned and cfg.train.qat == "mxfp4" and not _experts_on_mxfp4_grid(cfg, hf_config):
        # Fake quantization encodes whole blocks of a whole tensor: these (non-MXFP4) experts
        # load whole on every rank, then DeepSpeed partitions them.
        partitioned = False
    _check_memory_plan(cfg, raw_ds, ep, family, hf_config, rt)
    _seed_everything(cfg.train_seed)
    phase("data")

    model, tokenizer, memory, load_info = _build_model(
        cfg, rt, out, ep, ds_cfg if partitioned else None, family, hf_config, selection
    )
    items, data_hash, dropped = prepared.items, prepared.split.source_hash, prepared.dropped
    plan = BatchPlan(
        lengths=tuple(len(i) for i in items),
        micro_batch_size=cfg.train.micro_batch_size,
        world_size=rt.world_size,
        grad_accum=cfg.train.grad_accum,
        seed=cfg.train_seed,
    )
    total = plan.total_steps(cfg.train.steps, cfg.train.epochs)
    phase("model")

    from emmoe_dist.data.collate import pad_batch

    pad_id = tokenizer.pad_token_id
    wrapper, fast = apply_fast_paths(
        model,
        family,
        kernels=cfg.train.kernels,
        compile=cfg.train.compile,
        device=rt.device,
        packed=cfg.data.pack,
        zero3=zero_stage(raw_ds) == 3,
        loss=cfg.train.loss,
        aux_loss_coef=cfg.train.router_aux_loss_coef or 0.0,
    )
    longest = max(range(len(items)), key=lambda i: len(items[i]))
    ckpt_plan = _plan_checkpointing(
        cfg, wrapper, family, pad_batch([items[longest]], pad_id), fast, rt
    )
    if rt.is_main:
        print(f"[emmoe] {fast.describe()}; {ckpt_plan.describe()}", flush=True)
    phase("kernels and checkpointing plan")

    strategy = DeepSpeedStrategy(ds_cfg, rt)
    strategy.setup(wrapper, cfg.train, total)
    phase("DeepSpeed engine")
    router_before = _router_digest(wrapper.lm, family, strategy)
    routing_before = None
    if cfg.adapter.train_router:
        # Before any checkpoint loads: the model is still the base (LoRA B and router as loaded).
        profile_items = _router_profile_items(cfg, tokenizer)
        routing_before = _routing_profile(
            wrapper.lm,
            family,
            profile_items,
            pad_id,
            cfg,
            rt,
            when="before training",
            data_hash=data_hash,
        )
    ckpt_dir = out / rf.CHECKPOINTS_DIR
    state = strategy.load_checkpoint(ckpt_dir) or {}
    start = int(state.get("step", 0))
    # Checkpoints hold the trained tensors only: the frozen weights come from the model again.
    # Its routers stand for the rest: a different base under the same name is refused.
    if state.get("base_routers", router_before) != router_before:
        raise EmmoeError(
            f"{cfg.model.name_or_path} is not the model the checkpoints in {ckpt_dir} trained "
            "(its router weights differ): resume with that model, or train into a new output_dir"
        )
    # a run that stopped early and crashed before its manifest: it ends where it stopped
    stopped = rf.Stopped(**state["stopped"]) if state.get("stopped") else None
    if stopped is not None:
        total = start
    if rt.is_main:
        selection.save(out / rf.SELECTION)
        if start:
            print(f"[emmoe] resuming from step {start} of {total}", flush=True)
    log = art.MetricsLog(out / rf.TRAIN_METRICS, start) if rt.is_main else None
    tracker = make_tracker(
        cfg.tracking,
        is_main=rt.is_main,
        name=cfg.name,
        config=cfg.model_dump(mode="json"),
        folder=str(out),
        run_id=wandb_run_id(out, prepared.identity),
    )
    if start:  # the run's W&B history continues from its first step, each step once
        replay_history(tracker, rf.read_train_metrics(out), cfg.train.log_every)
    monitor = _monitor(cfg, prepared.probes, wrapper.lm, family, fast, rt, int(pad_id or 0))
    if monitor is not None and start == 0:  # the signal before any step: the base's value
        reading = {"step": 0, **monitor.read()}
        if log is not None:
            log.write(reading)
        tracker.log({k: v for k, v in reading.items() if k != "step"}, 0)

    phase("resume, tracking and monitor")
    if rt.is_main:
        print(f"[emmoe] {startup_summary(started, phases)}", flush=True)
    from tqdm import tqdm

    strategy.engine.train()
    # a run resumed at its last step (it crashed while saving) still reports its final loss
    last_loss = next(
        (
            float(r["loss"])
            for r in rf.read_train_metrics(out)
            if r.get("step") == start and "loss" in r
        ),
        float("nan"),
    )
    bar = tqdm(
        range(start, total),
        initial=start,
        total=total,
        desc="train",
        unit="step",
        disable=not rt.is_main,
        dynamic_ncols=True,
    )

    cuda = rt.device.type == "cuda"

    def host_step(step: int) -> list[HostMicroBatch]:
        return [
            host_micro_batch(
                pad_batch([items[i] for i in idx], pad_id),
                _model_inputs,
                fast.host_kwargs,
                pin=cuda,
            )
            for idx in plan.micro_batches(step, rt.rank)
        ]

    def one_step(micro: list[HostMicroBatch]) -> StepReadout:
        """Queue one optimizer step; its loss, token counts and gradient norm (summed over
        ranks) reach the host through the returned readout.

        The loss stays on the device until the step ends, so no micro-batch waits for the
        GPU to drain.
        """
        loss_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
        counts = torch.tensor(
            [sum(mb.label_tokens for mb in micro), sum(mb.input_tokens for mb in micro)],
            dtype=torch.float64,
        )
        for mb in micro:
            loss = strategy.forward(**mb.to(rt.device))
            strategy.backward(loss)
            strategy.step()
            loss_sum += loss.detach().double() * mb.label_tokens
        return StepReadout(loss_sum, counts, strategy.grad_norm(), rt.device)

    def quiet(done: int) -> bool:
        """Whether nothing after step `done` reads the model or decides from its row: then its
        row is read once the next step is queued, and the GPU does not wait for the host."""
        every, save_every = cfg.train.snapshot_every, cfg.train.save_every
        return cuda and not (
            done >= total
            or observe is not None
            or cfg.train.stop_when is not None
            or (monitor is not None and monitor.due(done))
            or (every and done % every == 0)
            or (save_every and done % save_every == 0)
            or (stop_after is not None and done >= stop_after)
            or cfg.train.profile_step in (done, done + 1)
        )

    def record(done: int, values: StepValues, lr: float, dt: float) -> dict[str, Any]:
        """The metrics row of step `done`, written and checked (a diverged step stops the run)."""
        row: dict[str, Any] = {
            "step": done,
            "loss": values.loss,
            "lr": lr,
            "grad_norm": values.grad_norm,
            "tokens": int(values.input_tokens),
            "tokens_per_s": values.input_tokens / dt,
            "step_time_s": dt,
        }
        if cuda:
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(rt.device) / GIB
        if monitor is not None and monitor.due(done):
            read_at = time.perf_counter()
            row.update(monitor.read())  # ends on the host: the time is the reading's own
            row["monitor_s"] = time.perf_counter() - read_at
        if observe is not None:
            observe(done, wrapper.lm)
        if log is not None:
            log.write(row)
        if done % cfg.train.log_every == 0:
            tracker.log({k: v for k, v in row.items() if isinstance(v, float | int)}, done)
        diverged = divergence(row)
        if diverged is not None:  # before any save: the last checkpoint stays the good one
            raise EmmoeError(
                f"{diverged}; the weights after this step are not saved (last checkpoint: "
                f"{strategy.latest_tag(ckpt_dir) or 'none'}). Lower train.lr or "
                "train.max_grad_norm, or check the training data."
            )
        bar.set_postfix(loss=f"{values.loss:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
        return row

    # step s+1 is padded and pinned on a worker thread while step s runs on the GPU
    step_inputs = prefetched(range(start, total), host_step)
    # a quiet step whose row is not read yet: (step, readout, the rate it ran at)
    waiting: tuple[int, StepReadout, float] | None = None
    clock = StepClock(rt.device)
    for step, micro in zip(bar, step_inputs, strict=False):
        done = step + 1
        if cfg.train.profile_step == done:
            holder: list[StepReadout] = []

            def profiled_step(
                micro: list[HostMicroBatch] = micro, holder: list[StepReadout] = holder
            ) -> None:
                holder.append(one_step(micro))
                holder[0].values()  # the profile covers the whole step

            profiled = profile_step(
                profiled_step,
                lora_rank=cfg.adapter.rank,
                vocab=int(hf_config.get("vocab_size", 0)) or None,
                device=rt.device,
            )
            readout = holder[0]
            if rt.is_main:
                write_profile(profiled, f"{cfg.name} step {done}", out)
                print(profiled.markdown(f"[emmoe] profile of step {done}"), flush=True)
        else:
            readout = one_step(micro)
        lr = strategy.lr()
        if waiting is not None:  # the step before, read while this one runs
            before, earlier, earlier_lr = waiting
            record(before, earlier.values(), earlier_lr, clock.lap(earlier))
            waiting = None
        if quiet(done):
            waiting = (done, readout, lr)
            continue
        values = readout.values()
        row = record(done, values, lr, clock.lap(readout))
        last_loss = values.loss
        stopped = _stop(cfg, row, total)
        interrupt = stop_after is not None and done >= stop_after and done < total
        last = done == total or stopped is not None
        every = cfg.train.snapshot_every
        if every and done % every == 0 and not last:  # the last point is the final artifact
            _save_snapshot(cfg, wrapper.lm, family, selection, strategy, rt, out, done, last_loss)
        # The last step too: a crash while the artifact is saved resumes there, not earlier.
        if last or (cfg.train.save_every and done % cfg.train.save_every == 0) or interrupt:
            if rt.is_main:
                record_identity(out, prepared.identity)
            strategy.save_checkpoint(
                ckpt_dir,
                f"step{done}",
                {"step": done, "stopped": _stopped_state(stopped), "base_routers": router_before},
            )
        clock.restart()  # a monitor reading or a save is not part of the next step's time
        if interrupt:
            step_inputs.close()
            if log is not None:
                log.close()
            tracker.finish()
            return TrainResult(out, done, last_loss, out / rf.CHECKPOINTS_DIR)
        if stopped is not None:
            if rt.is_main:
                print(f"[emmoe] stopped at step {done}: {stopped.rule} ({stopped.value:g})")
            break
    bar.close()
    step_inputs.close()
    steps_done = stopped.step if stopped is not None else total

    router_after = _router_digest(wrapper.lm, family, strategy)
    routing = None
    if routing_before is None and router_after != router_before:
        raise EmmoeError("router weights changed during training; the router must never train")
    if routing_before is not None:
        routing_after = _routing_profile(
            wrapper.lm,
            family,
            profile_items,
            pad_id,
            cfg,
            rt,
            when="after training",
            data_hash=data_hash,
        )
        if rt.is_main:
            change = _record_routing_change(routing_before, routing_after, selection, out)
            routing = rf.RouterTraining(
                weights=cfg.adapter.router_weights,
                aux_loss_coef=cfg.train.router_aux_loss_coef or 0.0,
                digest_before=router_before,
                profile_examples=len(profile_items),
                tokens=int(change["tokens"]),
                mean_kl=float(change["mean_kl"]),
                max_kl=float(change["max_kl"]),
                mean_total_variation=float(change["mean_total_variation"]),
            )
    artifact = _save_artifact(cfg, wrapper.lm, family, selection, strategy, rt, out)
    if rt.is_main:
        assert log is not None
        log.close()
        manifest = rf.RunManifest(
            name=cfg.name,
            config=cfg.model_dump(mode="json"),
            config_yaml=dump_config(cfg),
            ds_config=ds_cfg,
            expert_parallel=None
            if ep is None
            else rf.ExpertParallelism(ep_size=load_info.ep_size, requested=str(ep.ep_size)),
            family=family.name,
            selection=json.loads(selection.to_json()),
            world_size=rt.world_size,
            device=rt.device.type,
            load=rf.ModelLoad(
                partitioned=load_info.partitioned,
                resident_elements_rank0=load_info.resident_elements,
            ),
            versions=art.package_versions(),
            git_revision=art.git_revision(),
            data=rf.DataProvenance(
                train=cfg.data.train,
                source_hash=data_hash,
                examples=len(items),
                dropped_no_assistant_tokens=dropped,
                expected_hash=prepared.split.expected_hash,
                verified=prepared.split.verified,
            ),
            steps=steps_done,
            final_loss=None if math.isnan(last_loss) else last_loss,
            router_digest=router_after,
            qat=None
            if load_info.qat_changed is None
            else rf.QuantizationAware(format="mxfp4", expert_weights_changed=load_info.qat_changed),
            eval_weights=cfg.eval.weights,
            router=routing,
            weight_memory=None
            if memory is None
            else rf.WeightMemory(
                bytes=memory.total_bytes, fraction_of_bf16=memory.fraction_of_bf16
            ),
            artifact="adapter" if artifact.name == rf.ADAPTER_DIR else "expert_delta",
            base_model=base_model_id(cfg),
            completed_at=datetime.now(UTC).isoformat(timespec="seconds"),
            identity=prepared.identity,
            snapshots=tuple(s for s in rf.list_snapshots(out) if s.step < steps_done),
            stopped=stopped,
        )
        rf.write_manifest(out, manifest)
        tracker.summary({"final_loss": last_loss, "steps": steps_done})
    tracker.finish()
    return TrainResult(out, steps_done, last_loss, artifact, wrapper.lm)
