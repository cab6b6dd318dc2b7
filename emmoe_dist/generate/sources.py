"""Which weights answer: a base model, plus a training run's adapter (or expert deltas), or a
merged model folder; and how records name them.

    --run RUN_DIR     a training run: its manifest names the base it trained on and its artifact
                      (or one of its snapshots, `RUN_DIR/snapshots/stepNNNNNN`)
    --adapter DIR     a PEFT adapter folder (or a run folder) on top of the config's model
    (neither)         the config's `model` as it is: a hub id, a folder (merged models too), tiny

`model_source` resolves one model argument on its own (the interpretability commands'
`--model`): a checkpoint folder, a hub id, `tiny:<family>`, or a training run folder.

With `eval.weights: mxfp4`, a run answers through its MXFP4 export (GPT-oss as deployed),
written once into `<run>/mxfp4/` by `emmoe merge --format mxfp4`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from emmoe_dist import run_folder as rf
from emmoe_dist.config import ExperimentConfig, ModelConfig
from emmoe_dist.errors import EmmoeError, InputError
from emmoe_dist.files import read_json_object
from emmoe_dist.records import WeightsFormat

if TYPE_CHECKING:
    from emmoe_dist.models.loading import LoadedModel

_ADAPTER_CONFIG = "adapter_config.json"  # PEFT's


@dataclass(frozen=True, kw_only=True)
class ModelSource:
    base: ModelConfig  # what to load
    model_label: str  # `model` in the records: the base as the experiment names it
    adapter: Path | None = None  # a PEFT adapter folder
    expert_delta: Path | None = None  # a full-experts run's delta folder
    selection: str | None = None  # the trained experts, from expert_selection.json
    # dense: full-precision weights (an adapter merged in the load dtype); mxfp4: an MXFP4
    # checkpoint (a run's export, or an MXFP4 base with nothing merged into it)
    weights: WeightsFormat = "dense"
    export: Path | None = None  # the run's MXFP4 export that `base` loads
    qat: bool = False  # trained with train.qat: mxfp4 (merge onto the experts' MXFP4 values)
    trains_router: bool = False  # the adapter holds a router LoRA or router weights
    # how records name the adapter when a resumed file first named it otherwise (the same
    # folder spelled relative then absolute): its records keep one name and one set of keys
    adapter_name: str | None = None

    @property
    def adapter_folder(self) -> Path | None:
        """What was applied on the base (or the run's export that replaced it)."""
        return self.adapter or self.expert_delta or self.export

    @property
    def adapter_label(self) -> str | None:
        """`adapter` in the records: the folder of what was applied on the base (or of the
        run's export that replaced it)."""
        if self.adapter_name is not None:
            return self.adapter_name
        folder = self.adapter_folder
        return str(folder) if folder is not None else None

    @property
    def label(self) -> str:
        """How reports name this model: the base, plus what was applied on it."""
        adapter = self.adapter_label
        return f"{self.model_label} + {adapter}" if adapter else self.model_label


def _selection_label(folder: Path) -> str | None:
    path = folder / rf.SELECTION
    if not path.is_file():
        return None
    rule = read_json_object(path, "selection").get("rule")
    return str(rule) if rule else "file"


def from_snapshot(folder: str | Path) -> ModelSource:
    """A run's snapshot (`train.snapshot_every`): its base and the adapter of that step."""
    snapshot = Path(folder)
    info = rf.read_snapshot(snapshot)
    artifact = snapshot / info.artifact
    if not artifact.is_dir():
        raise InputError(
            f"the snapshot's artifact folder {artifact} is missing",
            file=str(snapshot / rf.SNAPSHOT_INFO),
            field="artifact",
        )
    return ModelSource(
        base=ModelConfig(name_or_path=info.base_model, family=info.family),
        model_label=info.model_name,
        adapter=artifact if info.artifact == rf.ADAPTER_DIR else None,
        expert_delta=artifact if info.artifact == rf.DELTA_DIR else None,
        selection=_selection_label(snapshot.parent.parent),
    )


def from_run(run_dir: str | Path) -> ModelSource:
    """A finished training run (the base it trained on and its adapter or expert deltas), or
    one of its snapshots."""
    run = Path(run_dir)
    if rf.is_snapshot(run):
        return from_snapshot(run)
    manifest = rf.read_manifest(run)
    # a folder (tiny runs save their base in the run) or a hub id; relative folders are the run's
    base_name = manifest.base_model
    if not Path(base_name).is_absolute() and (run / base_name).is_dir():
        base_name = str(run / base_name)
    artifact = run / manifest.artifact
    if not artifact.is_dir():
        raise InputError(
            f"the run's artifact folder {artifact} is missing",
            file=str(run / rf.MANIFEST),
            field="artifact",
        )
    base = ModelConfig(name_or_path=base_name, family=manifest.family)
    return ModelSource(
        base=base,
        model_label=manifest.model_name or base_name,
        adapter=artifact if manifest.artifact == rf.ADAPTER_DIR else None,
        expert_delta=artifact if manifest.artifact == rf.DELTA_DIR else None,
        selection=_selection_label(run),
        qat=manifest.qat is not None,
        trains_router=manifest.router is not None,
    )


def mxfp4_export_of(run_dir: str | Path) -> ModelSource:
    """A finished run answering through its MXFP4 export, written on first use (GPT-oss)."""
    run = Path(run_dir)
    trained = from_run(run)
    folder = run / rf.MXFP4_DIR
    info = folder / rf.MERGE_INFO
    # An export older than the run's manifest belongs to an earlier run in the same folder.
    if not info.is_file() or info.stat().st_mtime < (run / rf.MANIFEST).stat().st_mtime:
        from emmoe_dist.adapters.merge import merge_run

        merge_run(run, folder, fmt="mxfp4")
    return ModelSource(
        base=ModelConfig(name_or_path=str(folder), family=trained.base.family),
        model_label=trained.model_label,
        selection=trained.selection,
        weights="mxfp4",
        export=folder,
        qat=trained.qat,
    )


def _checkpoint_weights(model: ModelConfig) -> WeightsFormat:
    """mxfp4 for a checkpoint that ships MXFP4 experts (GPT-oss), else dense."""
    if model.is_tiny:
        return "dense"
    from emmoe_dist.models.loading import checkpoint_config_file

    try:
        config = checkpoint_config_file(model.name_or_path, model.revision)
    except EmmoeError:
        return "dense"  # unreadable here: loading the model names the problem
    quant = read_json_object(config, "model config").get("quantization_config")
    return "mxfp4" if isinstance(quant, dict) and quant.get("quant_method") == "mxfp4" else "dense"


def model_source(spec: str) -> ModelSource:
    """A checkpoint, hub id or tiny model as it is; a run (or snapshot) folder as its base plus
    artifact."""
    if rf.is_run(spec) or rf.is_snapshot(spec):
        return from_run(Path(spec).expanduser())
    from emmoe_dist.models.loading import parse_model_spec

    return ModelSource(base=parse_model_spec(spec), model_label=spec)


def run_base(spec: str) -> str | None:
    """The base model a training run trained on (None when `spec` is not a run folder)."""
    is_run = rf.is_run(spec) or rf.is_snapshot(spec)
    return model_source(spec).base.name_or_path if is_run else None


def resolve_source(
    cfg: ExperimentConfig, *, adapter: str | None = None, run: str | None = None
) -> ModelSource:
    """The weights to generate with (module docstring)."""
    if adapter is not None and run is not None:
        raise EmmoeError("give --adapter or --run, not both")
    mxfp4 = cfg.eval.weights == "mxfp4"
    if run is not None:
        return mxfp4_export_of(run) if mxfp4 else from_run(run)
    if adapter is not None:
        folder = Path(adapter)
        if rf.is_run(folder):
            return mxfp4_export_of(folder) if mxfp4 else from_run(folder)
        if mxfp4:
            raise InputError(
                "evaluates a training run's MXFP4 export: pass --run RUN_DIR (or export with "
                "`emmoe merge RUN --format mxfp4 --out DIR` and generate from DIR)",
                field="eval.weights",
            )
        if rf.is_snapshot(folder):
            return from_run(folder)
        if not (folder / _ADAPTER_CONFIG).is_file():
            raise EmmoeError(
                f"{folder} is not a PEFT adapter folder (no {_ADAPTER_CONFIG}) nor a run folder"
            )
        return ModelSource(
            base=cfg.model,
            model_label=cfg.model.name_or_path,
            adapter=folder,
            selection=_selection_label(folder),
        )
    folder = Path(cfg.model.name_or_path)
    return ModelSource(
        base=cfg.model,
        model_label=cfg.model.name_or_path,
        selection=_selection_label(folder) if folder.is_dir() else None,
        weights=_checkpoint_weights(cfg.model),
    )


def load_for_generation(
    source: ModelSource,
    *,
    seed: int = 0,
    dtype: str | None = None,
    device: str | None = None,
    device_map: str | None = None,
) -> LoadedModel:
    """The base with the adapter (or expert deltas) merged in, in eval mode on `device` (or
    spread over the GPUs by `device_map="auto"`, for a model larger than one)."""
    from emmoe_dist.models.loading import LoadedModel, load_model

    loaded = load_model(
        source.base,
        seed=seed,
        dtype=dtype,
        device=device,
        device_map=device_map,
        for_training=False,
    )
    model = loaded.model
    if source.qat and (source.adapter is not None or source.expert_delta is not None):
        from emmoe_dist.adapters.mxfp4 import fake_quantize_experts

        fake_quantize_experts(model, loaded.family)  # the base the run trained against
    if source.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(source.adapter)).merge_and_unload()
    elif source.expert_delta is not None:
        from safetensors.torch import load_file

        from emmoe_dist.adapters.expert_delta import DELTA_FILE, merge_expert_delta

        merge_expert_delta(model, load_file(str(source.expert_delta / DELTA_FILE)))
    model.eval()
    return LoadedModel(model=model, tokenizer=loaded.tokenizer, family=loaded.family)


def trajectory_folders(run: str | Path) -> list[Path]:
    """A training run's snapshot folders in step order (the run itself is the last point)."""
    manifest = rf.read_manifest(run)
    return [Path(run) / snap.folder for snap in manifest.snapshots]
