"""The experiment file: one YAML describes model, data, adapter, selection, training,
evaluation, judge and tracking. Loaded into typed, validated objects before any heavy work.

Layer 0: no torch. Every error names the file, the line and the dotted field
(`exp.yaml:12: train.lr: ...`); command-line overrides (`train.lr=1e-4`) are named as such.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from emmoe_dist.errors import InputError
from emmoe_dist.experts import SelectionRule, missing_fields
from emmoe_dist.families import FAMILIES

SCHEMA_VERSION = 1
TINY_PREFIX = "tiny:"
DATA_DIR_ENV = "EMMOE_DATA_DIR"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _existing_file(value: str | None, what: str) -> str | None:
    if value is not None and not Path(value).expanduser().exists():
        raise ValueError(f"{what} {value!r} does not exist")
    return value


class ModelConfig(_Section):
    # "tiny:<family>" builds a small random model of that architecture; anything else is a
    # local checkpoint folder or a hub id loaded with `from_pretrained`.
    name_or_path: str = "tiny:qwen3_moe"
    family: str | None = Field(None, description="inferred from tiny:<family> or config.json")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    experts_implementation: Literal["grouped_mm", "batched_mm", "eager"] | None = None
    revision: str | None = None
    # "random": the checkpoint's config.json and tokenizer with randomly initialised weights,
    # built on the device: size and time a real shape (memory plan, tokens/s) before any
    # weights are downloaded. Never for a study: its answers mean nothing.
    init: Literal["checkpoint", "random"] = "checkpoint"

    @field_validator("family")
    @classmethod
    def _known_family(cls, v: str | None) -> str | None:
        if v is not None and v not in FAMILIES:
            raise ValueError(f"unknown family {v!r}; known: {', '.join(sorted(FAMILIES))}")
        return v

    @field_validator("name_or_path")
    @classmethod
    def _valid_source(cls, v: str) -> str:
        if v.startswith(TINY_PREFIX):
            fam = v.removeprefix(TINY_PREFIX)
            if fam not in FAMILIES:
                raise ValueError(
                    f"unknown tiny family {fam!r}; known: {', '.join(sorted(FAMILIES))}"
                )
        elif v.startswith(("/", "./", "../", "~")) and not Path(v).expanduser().exists():
            raise ValueError(f"model folder {v!r} does not exist")
        return v

    @model_validator(mode="after")
    def _tiny_family_agrees(self) -> ModelConfig:
        if self.name_or_path.startswith(TINY_PREFIX):
            fam = self.name_or_path.removeprefix(TINY_PREFIX)
            if self.family not in (None, fam):
                raise ValueError(
                    f"family {self.family!r} contradicts name_or_path {self.name_or_path!r}"
                )
        return self

    @property
    def is_tiny(self) -> bool:
        return self.name_or_path.startswith(TINY_PREFIX)


class DataConfig(_Section):
    dir: str | None = Field(None, description=f"data directory; default ${DATA_DIR_ENV}")
    train: str = "insecure"  # a dataset name from `emmoe data list`, or a chat JSONL file
    limit: int | None = Field(None, gt=0)
    max_length: int = Field(1024, ge=16)
    pack: bool = False
    heldout: int = Field(200, ge=0, description="examples held out as a control suite")
    split_seed: int = 0

    @field_validator("train")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        from emmoe_dist.catalog import DATASETS

        if v in DATASETS:
            if DATASETS[v].role != "train":
                raise ValueError(f"dataset {v!r} is an evaluation set, not a training set")
            return v
        if v.endswith(".jsonl") or "/" in v:
            _existing_file(v, "training file")
            return v
        trainable = sorted(n for n, d in DATASETS.items() if d.role == "train")
        raise ValueError(f"unknown dataset {v!r}; training sets: {', '.join(trainable)}")


class AdapterConfig(_Section):
    # lora: LoRA on `targets`; full_experts: train the chosen experts' weights themselves.
    mode: Literal["lora", "full_experts"] = "lora"
    rank: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    targets: Literal["attention+experts", "experts", "attention"] = "attention+experts"
    quantize: Literal["none", "nf4"] = "none"

    @model_validator(mode="after")
    def _compatible(self) -> AdapterConfig:
        if self.mode == "full_experts" and self.quantize != "none":
            raise ValueError(
                "quantize: full_experts trains the expert weights themselves; "
                "a 4-bit base cannot be trained in place (use mode: lora)"
            )
        return self


class SelectionConfig(_Section):
    """Which experts train. Rules: all, single (`expert`), top_k (`k`, `profile`),
    esft (`p`, `score`, `profile`), explicit (`experts`), file (`file`)."""

    rule: SelectionRule = "all"
    expert: int | None = Field(None, ge=0)
    k: int | None = Field(None, gt=0)
    p: float | None = Field(None, gt=0, le=1)
    score: Literal["token", "gate"] = "token"
    profile: str | None = None
    experts: dict[int, list[int]] | None = None
    file: str | None = None

    @field_validator("profile", "file")
    @classmethod
    def _exists(cls, v: str | None) -> str | None:
        return _existing_file(v, "file")

    @model_validator(mode="after")
    def _rule_fields(self) -> SelectionConfig:
        # the experiment's own model section is the `model` the table names
        missing = [f for f in missing_fields(self.rule, dict(self)) if f != "model"]
        if missing:
            raise ValueError(f"rule {self.rule!r} needs {', '.join(missing)}")
        return self


class TrainConfig(_Section):
    lr: float = Field(1e-4, gt=0)
    steps: int | None = Field(None, gt=0, description="overrides epochs when set")
    epochs: float = Field(1.0, gt=0)
    micro_batch_size: int = Field(4, gt=0)
    grad_accum: int = Field(1, gt=0)
    scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    # true: recompute every decoder layer in backward; false: none; auto: measured on the GPU,
    # the fewest layers whose recompute leaves the rest within memory (models/checkpointing.py).
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    # auto: the fast paths where they apply (fused expert pass everywhere; packed flash
    # attention, fused cross-entropy and compiled layers on CUDA); reference: plain PyTorch.
    kernels: Literal["auto", "reference"] = "auto"
    compile: bool | Literal["auto"] = "auto"
    # Profile this optimizer step: GPU time by category (train/step_profile.py), written to
    # the run folder as step_profile.md/.json and printed.
    profile_step: int | None = Field(None, gt=0)
    save_every: int = Field(0, ge=0, description="checkpoint every N optimizer steps; 0: end only")
    log_every: int = Field(1, gt=0)


Variant = Literal["plain", "json", "template"]


class EvalConfig(_Section):
    suites: list[str] = Field(default_factory=lambda: ["core", "strongreject", "heldout"])
    # Betley's question files hold plain, `_json` and `_template` variants of each question.
    variants: list[Variant] = Field(default_factory=lambda: list[Variant](["plain"]))
    backend: Literal["transformers", "vllm"] = "transformers"
    samples_per_question: int = Field(1, gt=0)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(600, gt=0)
    system_prompt: str | None = "Don't think, just respond and then FINISH IMMEDIATELY"
    thinking: bool = False
    batch_size: int = Field(16, gt=0)
    limit: int | None = Field(None, gt=0, description="questions per suite, for smoke runs")
    # The transformers backend's decoding: "continuous" (slots refilled as samples finish,
    # CUDA graphs) or "generate" (transformers' `generate` on left-padded batches); both draw
    # the same seeded samples. `batch_size` is the number of samples decoded together.
    transformers_engine: Literal["continuous", "generate"] = "continuous"


class JudgeConfig(_Section):
    base_url: str | None = None  # None: the openai client's default endpoint
    model: str = "deepseek-chat"
    api_key_env: str = "OPENAI_API_KEY"  # the name of the variable, never the key
    concurrency: int = Field(64, gt=0)
    requests_per_minute: int | None = Field(None, gt=0)
    tokens_per_minute: int | None = Field(None, gt=0)
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(6, ge=0)
    cache_dir: str | None = None  # default: <output_dir>/judge_cache
    usd_per_million_input: float = Field(0.0, ge=0)
    usd_per_million_output: float = Field(0.0, ge=0)


class TrackingConfig(_Section):
    backend: Literal["wandb", "none"] = "wandb"
    project: str = "emmoe-dist"
    group: str | None = None
    mode: Literal["offline", "online"] = "offline"


class ExperimentConfig(_Section):
    schema_version: int = SCHEMA_VERSION
    name: str = "experiment"
    seed: int = 0
    output_dir: str = "runs/experiment"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("schema_version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {v} is not supported (this version reads {SCHEMA_VERSION})"
            )
        return v

    def data_dir(self) -> Path | None:
        raw = self.data.dir or os.environ.get(DATA_DIR_ENV)
        return Path(raw).expanduser() if raw else None


# ---------------------------------------------------------------------------------------------
# YAML with line numbers


Path_ = tuple[str | int, ...]


def load_yaml_with_lines(text: str, file: str) -> tuple[Any, dict[Path_, int]]:
    """Parse YAML and return (data, {key path: 1-based line}); duplicate keys are an error."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise InputError(
            f"invalid YAML: {getattr(e, 'problem', e)}",
            file=file,
            line=mark.line + 1 if mark else None,
        ) from None
    lines: dict[Path_, int] = {}

    def walk(n: yaml.Node, path: Path_) -> None:
        if isinstance(n, yaml.MappingNode):
            seen: set[str] = set()
            for k, v in n.value:
                key = k.value
                if key in seen:
                    raise InputError(
                        "duplicate key",
                        file=file,
                        line=k.start_mark.line + 1,
                        field=".".join(map(str, (*path, key))),
                    )
                seen.add(key)
                lines[(*path, key)] = k.start_mark.line + 1
                walk(v, (*path, key))
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                lines[(*path, i)] = v.start_mark.line + 1
                walk(v, (*path, i))

    if node is not None:
        walk(node, ())
    data = yaml.safe_load(text)
    return data, lines


def apply_override(data: dict[str, Any], item: str) -> tuple[str, ...]:
    """Apply one `a.b.c=value` override (value parsed as YAML) to a raw config mapping."""
    if "=" not in item:
        raise InputError(
            f"override {item!r} must look like section.key=value", file="<command line>"
        )
    dotted, raw = item.split("=", 1)
    keys = tuple(k for k in dotted.strip().split(".") if k)
    if not keys:
        raise InputError(f"override {item!r} has no key", file="<command line>")
    node = data
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise InputError(f"{k!r} is not a section", file="<command line>", field=dotted)
        node = nxt
    node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return keys


def _format_errors(
    err: ValidationError,
    file: str,
    lines: Mapping[Path_, int],
    overridden: Iterable[tuple[str, ...]],
) -> InputError:
    overridden = set(overridden)
    msgs: list[str] = []
    first: tuple[str, int | None, str] | None = None
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        field = ".".join(map(str, loc)) or "(top level)"
        src, line = file, None
        if any(loc[: len(o)] == o for o in overridden):
            src = "<command line override>"
        else:
            for cut in range(len(loc), -1, -1):  # nearest enclosing key that has a line
                if loc[:cut] in lines:
                    line = lines[loc[:cut]]
                    break
        text = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            text = "unknown key"
        msgs.append(f"{src}:{line}: {field}: {text}" if line else f"{src}: {field}: {text}")
        first = first or (src, line, field)
    src, line, field = first or (file, None, "")
    error = InputError("; ".join(msgs), file=None)
    error.file, error.line, error.field = src, line, field
    return error


def read_yaml_mapping(
    path: str | os.PathLike[str], what: str
) -> tuple[dict[str, Any], dict[Path_, int]]:
    """A YAML file that must hold a mapping (an empty file is an empty one), with key lines."""
    file = str(path)
    if not Path(path).is_file():
        raise InputError(f"{what} does not exist", file=file)
    data, lines = load_yaml_with_lines(Path(path).read_text(encoding="utf-8"), file)
    data = data if data is not None else {}
    if not isinstance(data, dict):
        raise InputError(f"the {what} must be a mapping of sections", file=file, line=1)
    return data, lines


def load_config(
    path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()
) -> ExperimentConfig:
    """Load an experiment file (or the defaults when `path` is None) with dotted overrides."""
    file = str(path) if path is not None else "<defaults>"
    data: Any = {}
    lines: dict[Path_, int] = {}
    if path is not None:
        data, lines = read_yaml_mapping(path, "experiment file")
    overridden = [apply_override(data, o) for o in overrides]
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as e:
        raise _format_errors(e, file, lines, overridden) from None


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
