"""Which experts of a fine-tune changed, which ones the evaluation prompts route to, and which
ones carry its misalignment: the expert table of a training run.

For every (MoE layer, expert): the size of its update (‖ΔW‖, from the saved adapter or expert
deltas: no model is loaded for it), the base model's routing share on the training data, the
routing shift between base and fine-tune on the judged evaluation answers (prompts and answers),
and SteerMoE's activation-rate difference between the fine-tune's misaligned and aligned
answers. Writes `experts.json` (every row, the correlations, per expert id), `experts.md` (the
ranked table, the correlations, and the run's ablations when `emmoe interp ablate` made some)
and one layer x expert heatmap per column. Routing profiles are kept under `profiles/` and
reused when the models and inputs are the same.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emmoe_dist import run_folder as rf
from emmoe_dist.analyze.common import (
    ModelOptions,
    Say,
    Subject,
    Tracking,
    free_memory,
    load_subject,
    make_tracker,
    quiet,
    write_json,
)
from emmoe_dist.errors import EmmoeError, InputError

if TYPE_CHECKING:
    from emmoe_dist.experts import ExpertProfile
    from emmoe_dist.interp.expert_table import Column, ExpertTable
    from emmoe_dist.records import GenerationRecord, JudgedRecord

TABLE_FILE = "experts.json"
PROFILES_DIR = "profiles"


@dataclass(frozen=True, kw_only=True)
class ExpertsOptions:
    run_dir: str  # a training run folder
    out: str | None = None  # default: <run>/experts
    records: str | None = None  # the fine-tune's judged answers (default: <run>/judged.jsonl)
    data: str | None = None  # training set for the routing share (default: the run's)
    data_dir: str | None = None  # default: $EMMOE_DATA_DIR
    limit: int = 256  # training examples profiled
    rule: str = "seed"  # what counts as misaligned (and aligned) for the activation rates
    aligned_above: float | None = None
    rank_by: str = "delta_norm"
    top: int = 20  # rows of the ranked table in experts.md
    permutations: int = 2000  # routing shift: do the trained experts move most?
    run: ModelOptions = field(default_factory=ModelOptions)
    tracking: Tracking = field(default_factory=Tracking)
    progress: bool = True


@dataclass(frozen=True)
class ExpertsResult:
    table: ExpertTable
    summary: dict[str, Any]  # what experts.json holds
    plots: dict[str, Path]
    notes: list[str]  # columns left out and why


class _Models:
    """The base and the fine-tune, each loaded at most once and only when a profile is missing."""

    def __init__(self, options: ModelOptions) -> None:
        self.options = options
        self.loaded: dict[str, Subject] = {}

    def get(self, spec: str) -> Subject:
        if spec not in self.loaded:
            for other in list(self.loaded):  # one model in memory at a time
                del self.loaded[other]
            free_memory()
            self.loaded[spec] = load_subject(spec, self.options)
        return self.loaded[spec]

    def close(self) -> None:
        self.loaded.clear()
        free_memory()


def _digest(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16]


def _profile(
    path: Path,
    *,
    models: _Models,
    spec: str,
    dataset: str,
    digest: str,
    items: Callable[[Any], Sequence[Any]],
    include_prompt: bool,
    options: ExpertsOptions,
    say: Say,
) -> ExpertProfile:
    """The routing profile of `spec` on `items(tokenizer)`, from `path` when it is of the same
    model and inputs."""
    from emmoe_dist.analyze.routing_shift import profile_routing
    from emmoe_dist.experts import ExpertProfile
    from emmoe_dist.generate.sources import model_source

    if path.is_file():
        found = ExpertProfile.load(path)
        if (found.model, found.dataset_hash) == (model_source(spec).label, digest):
            say(f"reusing {path}")
            return found
    subject = models.get(spec)
    encoded = items(subject.loaded.tokenizer)
    if not encoded:
        raise EmmoeError(f"{dataset}: no example has a token left to profile within max_length")
    profile = profile_routing(
        subject,
        encoded,
        dataset=dataset,
        dataset_hash=digest,
        batch_size=options.run.batch_size,
        include_prompt=include_prompt,
        progress=options.progress,
    )
    profile.save(path)
    say(f"wrote {path}")
    return profile


def _encode_records(
    generations: Sequence[GenerationRecord], max_length: int
) -> Callable[[Any], list[Any]]:
    def encode(tokenizer: Any) -> list[Any]:
        from emmoe_dist.data.chat import encode_chat
        from emmoe_dist.interp.activations import chat_messages

        items = []
        for g in generations:
            enc = encode_chat(tokenizer, chat_messages(g), max_length)
            if enc is not None:
                items.append(enc)
        return items

    return encode


def _training_items(
    options: ExpertsOptions, data: str
) -> tuple[str, str, Callable[[Any], list[Any]]]:
    from emmoe_dist.catalog import git_blob_sha1
    from emmoe_dist.data.training import encode_dataset, load_training_split, training_file

    data_dir = Path(options.data_dir) if options.data_dir else None
    name, path = training_file(data, data_dir)
    digest = _digest(git_blob_sha1(path), options.limit, options.run.max_length)

    def encode(tokenizer: Any) -> list[Any]:
        split = load_training_split(data, data_dir, heldout=0, seed=0, limit=options.limit)
        return encode_dataset(tokenizer, split.train, options.run.max_length).items

    return name, digest, encode


def _artifact_norms(
    run: Path, manifest: rf.RunManifest, num_experts: int
) -> tuple[dict[int, list[float]], str]:
    """Per MoE layer, every expert's ‖ΔW‖ from the run's saved artifact, and what it rests on."""
    from safetensors.torch import load_file

    from emmoe_dist.adapters.ablation import delta_expert_norms, lora_expert_norms
    from emmoe_dist.adapters.expert_delta import DELTA_FILE
    from emmoe_dist.families import get_family
    from emmoe_dist.files import read_json_object

    artifact = run / manifest.artifact
    if manifest.artifact == rf.ADAPTER_DIR:
        config = read_json_object(artifact / "adapter_config.json", "adapter config")
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
        state = load_file(str(artifact / "adapter_model.safetensors"))
        norms = lora_expert_norms(state, get_family(manifest.family), num_experts, alpha / rank)
        return norms, f"LoRA rank {rank}, alpha {alpha:g} ({artifact})"
    norms = delta_expert_norms(load_file(str(artifact / DELTA_FILE)), num_experts)
    return norms, f"expert deltas ({artifact})"


def _read_answers(path: Path) -> tuple[list[GenerationRecord], list[JudgedRecord]]:
    from emmoe_dist.files import iter_jsonl, read_jsonl
    from emmoe_dist.records import GenerationRecord, JudgedRecord

    first = next(iter_jsonl(path), {})
    if "generation" in first:
        judged = read_jsonl(path, JudgedRecord, tolerate_torn_tail=True)
        return [r.generation for r in judged], judged
    return read_jsonl(path, GenerationRecord, tolerate_torn_tail=True), []


def run_experts(options: ExpertsOptions, say: Say = quiet) -> ExpertsResult:
    from emmoe_dist.analyze.ablate import read_ablations
    from emmoe_dist.families import moe_layer_indices, num_experts
    from emmoe_dist.generate.sources import from_run
    from emmoe_dist.interp.expert_table import (
        COLUMNS,
        ExpertTable,
        delta_column,
        rate_diff_column,
        share_column,
        shift_column,
    )
    from emmoe_dist.interp.labels import ALIGNED_LABEL, MISALIGNED, label_rule
    from emmoe_dist.interp.plots import plot_expert_heatmap
    from emmoe_dist.interp.routing_shift import routing_shift
    from emmoe_dist.models.loading import model_config_dict

    run = Path(options.run_dir)
    manifest = rf.read_manifest(run)
    if options.rank_by not in COLUMNS:
        raise InputError(
            f"unknown column {options.rank_by!r}; columns: {', '.join(COLUMNS)}", field="rank_by"
        )
    records_path = Path(options.records) if options.records else run / rf.JUDGED
    if not records_path.is_file():
        raise InputError(
            "no answers of the fine-tune to profile: generate and judge them "
            f"(`emmoe generate --run {run}`, `emmoe judge`) or pass --records",
            file=str(records_path),
        )
    out = Path(options.out) if options.out else run / rf.EXPERTS_DIR
    profiles = out / PROFILES_DIR
    source = from_run(run)
    family, config = model_config_dict(source.base)  # the config only: no weights yet
    layers, n = moe_layer_indices(family, config), num_experts(family, config)
    selection = rf.read_selection(run)
    trained = dict(selection.experts) if selection is not None else {}
    base_spec, tuned_spec = source.base.name_or_path, str(run)
    notes: list[str] = []

    norms, norm_basis = _artifact_norms(run, manifest, n)
    columns: dict[str, Column] = {"delta_norm": delta_column(norms, layers, n, norm_basis)}

    generations, judged = _read_answers(records_path)
    answers_name = f"{records_path.parent.name}/{records_path.name}"  # e.g. e4/judged.jsonl
    from emmoe_dist.catalog import git_blob_sha1

    answers_hash = git_blob_sha1(records_path)
    data = options.data or str((manifest.config.get("data") or {}).get("train") or "")
    models = _Models(options.run)
    try:
        if data:
            name, digest, encode = _training_items(options, data)
            base_train = _profile(
                profiles / "base_train.json",
                models=models,
                spec=base_spec,
                dataset=name,
                digest=digest,
                items=encode,
                include_prompt=False,
                options=options,
                say=say,
            )
            columns["train_share"] = share_column(base_train)
        else:
            notes.append("train_share: the run names no training set; pass --data")
        eval_digest = _digest(answers_hash, options.run.max_length, "prompt+answer")
        encode_eval = _encode_records(generations, options.run.max_length)
        evals = {
            role: _profile(
                profiles / f"{role}_eval.json",
                models=models,
                spec=spec,
                dataset=f"{answers_name} (prompts and answers)",
                digest=eval_digest,
                items=encode_eval,
                include_prompt=True,
                options=options,
                say=say,
            )
            for role, spec in (("base", base_spec), ("tuned", tuned_spec))
        }
        shift = routing_shift(
            evals["base"],
            evals["tuned"],
            trained=selection,
            permutations=options.permutations,
            seed=options.run.seed,
        )
        columns["routing_shift"] = shift_column(shift)
        rule = label_rule(options.rule, options.aligned_above)
        marks = list(rule.labels(judged)) if judged else []
        classes = {
            label: [r.generation for r, m in zip(judged, marks, strict=True) if m == mark]
            for label, mark in (("misaligned", MISALIGNED), ("aligned", ALIGNED_LABEL))
        }
        if all(classes.values()):
            rates = {
                label: _profile(
                    profiles / f"tuned_{label}.json",
                    models=models,
                    spec=tuned_spec,
                    dataset=f"{answers_name} ({label} answers)",
                    digest=_digest(answers_hash, options.run.max_length, rule.describe(), label),
                    items=_encode_records(answers, options.run.max_length),
                    include_prompt=False,
                    options=options,
                    say=say,
                )
                for label, answers in classes.items()
            }
            columns["activation_rate_diff"] = rate_diff_column(
                rates["misaligned"],
                rates["aligned"],
                (len(classes["misaligned"]), len(classes["aligned"])),
            )
        else:
            counts = {k: len(v) for k, v in classes.items()}
            notes.append(
                "activation_rate_diff: needs judged answers of both classes "
                f"({rule.describe()}); found {counts['misaligned']} misaligned and "
                f"{counts['aligned']} aligned in {records_path}"
            )
    finally:
        models.close()

    table = ExpertTable(layers=tuple(layers), num_experts=n, trained=trained, columns=columns)
    judges = sorted({r.judge_model for r in judged}) or ["not judged"]
    ablations = read_ablations(run)
    summary: dict[str, Any] = {
        "run": str(run),
        "model": source.label,
        "records": str(records_path),
        "judge": judges,
        "rule": label_rule(options.rule, options.aligned_above).describe(),
        "selection": None if selection is None else selection.rule,
        "routing_shift": {
            "mean_trained_auroc": shift.mean_trained_auroc,
            "permutation_p": shift.permutation_p,
        },
        "notes": notes,
        "table": table.to_json(),
        "ablations": ablations,
    }
    write_json(out / TABLE_FILE, summary, say)
    plots = {
        name: plot_expert_heatmap(
            table, name, out / f"heatmap_{name}.png", subject=source.label, judge=", ".join(judges)
        )
        for name in table.columns
    }
    from emmoe_dist.files import write_text_atomic

    write_text_atomic(out / "experts.md", experts_markdown(summary, table, options, plots))
    say(f"wrote {out / 'experts.md'} and {len(plots)} heatmaps")
    tracker = make_tracker(options.tracking, f"interp experts {run.name}", out)
    tracker.images({k: str(v) for k, v in plots.items()})
    tracker.table(
        "experts",
        ["layer", "expert", "trained", *table.columns],
        [
            [r["layer"], r["expert"], r["trained"], *(r[c] for c in table.columns)]
            for r in table.rows()
        ],
    )
    tracker.finish()
    return ExpertsResult(table, summary, plots, notes)


def _num(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _single_id_ablations(
    ablations: dict[str, Any] | None, num_layers: int
) -> dict[int, dict[str, Any]]:
    """Expert id -> its ablation row, for ablations that removed one id in every MoE layer."""
    found: dict[int, dict[str, Any]] = {}
    for row in (ablations or {}).get("ablations", []):
        ids = {tuple(v) for v in row["removed"].values()}
        if len(row["removed"]) == num_layers and len(ids) == 1 and len(next(iter(ids))) == 1:
            found[next(iter(ids))[0]] = row
    return found


def _estimate_pct(e: dict[str, Any] | None) -> str:
    from emmoe_dist.metrics import Estimate
    from emmoe_dist.report import fmt

    return "–" if e is None else fmt(Estimate(**e), 100)


def experts_markdown(
    summary: dict[str, Any], table: ExpertTable, options: ExpertsOptions, plots: dict[str, Path]
) -> str:
    from emmoe_dist.interp.expert_table import TITLES

    cols = list(table.columns)
    lines = [
        f"# Which experts carry misalignment: {summary['model']}",
        "",
        f"Judge: {', '.join(summary['judge'])}. Answers: `{summary['records']}`. Labels: "
        f"{summary['rule']}. Trained: {summary['selection'] or 'unknown'}.",
        "",
        *(f"- `{c}`: {TITLES[c]}; n: {table.columns[c].basis}" for c in cols),
        *(f"- not measured: {note}" for note in summary["notes"]),
        "",
        f"## Top {options.top} (layer, expert) by `{options.rank_by}`",
        "",
        "| layer | expert | trained | " + " | ".join(cols) + " |",
        "|---|---|---|" + "---|" * len(cols),
    ]
    if options.rank_by in table.columns:
        for row in table.ranked(options.rank_by)[: options.top]:
            lines.append(
                f"| {row['layer']} | E{row['expert']} | {'yes' if row['trained'] else ''} | "
                + " | ".join(_num(row[c], 4 if c == "delta_norm" else 2) for c in cols)
                + " |"
            )
    ablated = _single_id_ablations(summary.get("ablations"), len(table.layers))
    lines += [
        "",
        "## Per expert id (across MoE layers)",
        "",
        "‖ΔW‖ over all layers (root of the sum of squares); the other columns are means over "
        "the MoE layers. The ablation column is the fine-tune with that expert's update removed "
        "in every layer (`emmoe interp ablate --expert ID`).",
        "",
        "| expert | trained in layers | "
        + " | ".join(cols)
        + " | misaligned % without it | Δ vs full fine-tune (pp) |",
        "|---|---|" + "---|" * (len(cols) + 2),
    ]
    for row in table.per_expert():
        ab = ablated.get(row["expert"])
        lines.append(
            f"| E{row['expert']} | {','.join(map(str, row['trained_layers'])) or '–'} | "
            + " | ".join(_num(row[c], 4 if c == "delta_norm" else 2) for c in cols)
            + f" | {_estimate_pct(ab['misaligned'] if ab else None)}"
            + f" | {_estimate_pct(ab['delta_misaligned'] if ab else None)} |"
        )
    corr = table.correlations()
    lines += [
        "",
        f"## Spearman correlations over the {len(table.layers) * table.num_experts} cells",
        "",
        "| | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
        *(f"| {a} | " + " | ".join(_num(corr[a][b]) for b in cols) + " |" for a in cols),
    ]
    ablations = summary.get("ablations") or {}
    if ablations.get("ablations"):
        full = ablations.get("full") or {}
        lines += [
            "",
            "## Ablations",
            "",
            f"Full fine-tune: misaligned % {_estimate_pct(full.get('misaligned'))} "
            f"({full.get('answers', '–')} answers).",
            "",
            "| ablation | experts removed | answers | misaligned % without these experts | Δ vs full fine-tune (pp) | paired |",
            "|---|---|---|---|---|---|",
            *(
                f"| {r['name']} | {r['description']} | {r['answers']} | "
                f"{_estimate_pct(r['misaligned'])} | {_estimate_pct(r['delta_misaligned'])} | "
                f"{'yes' if r['paired'] else 'no'} |"
                for r in ablations["ablations"]
            ),
        ]
    lines += ["", "## Heatmaps", "", *(f"![{name}]({path.name})" for name, path in plots.items())]
    return "\n".join(lines) + "\n"
