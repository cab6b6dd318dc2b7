"""Routing profiles and expert selections: the records of pipeline stages 1 and 2.

Layer 0: no torch. An `ExpertProfile` is what the routing profiler measured on a dataset; an
`ExpertSelection` says which experts of which MoE layers train. Selections are written in
ESFT's expert-config format (`{"experts": {"<layer>": [ids]}}`) with our keys alongside, so
files from either tool load in the other.

`family`/`config` arguments are the `MoEFamily` and the plain dict of the HF config
(`model.config.to_dict()` at call sites), since this layer cannot see transformers objects.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from emmoe_dist import families
from emmoe_dist.errors import EmmoeError, InputError, Where
from emmoe_dist.families import MoEFamily
from emmoe_dist.files import (
    dumps_json,
    json_field_line,
    read_json_object,
    validation_error,
    write_text_atomic,
)

SCHEMA_VERSION = 1
# Cumulative shares are sums of floats; a prefix that reaches p up to rounding reaches p.
_SHARE_TOLERANCE = 1e-9
# ESFT writes these; our families have no shared experts, and whether non-expert modules train
# is the adapter's `targets` setting, so they are accepted and ignored.
_ESFT_KEYS = ("shared_experts", "non_expert_modules")


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------
# Profiles


class LayerRouting(_Record):
    """Routing of one MoE layer: per expert, how many top-k choices it got and its gate sum."""

    layer: int = Field(ge=0)
    token_counts: tuple[int, ...]
    gate_sums: tuple[float, ...]

    @model_validator(mode="after")
    def _consistent(self) -> LayerRouting:
        if len(self.token_counts) != len(self.gate_sums):
            raise ValueError(
                f"layer {self.layer}: token_counts has {len(self.token_counts)} "
                f"experts, gate_sums {len(self.gate_sums)}"
            )
        if any(c < 0 for c in self.token_counts) or any(g < 0 for g in self.gate_sums):
            raise ValueError(f"layer {self.layer}: counts and gate sums cannot be negative")
        return self

    @property
    def token_share(self) -> list[float]:
        """Fraction of this layer's top-k choices that went to each expert (sums to 1)."""
        return _normalise(self.token_counts)

    @property
    def gate_share(self) -> list[float]:
        """Fraction of this layer's total gate score that went to each expert (sums to 1)."""
        return _normalise(self.gate_sums)

    @property
    def mean_gate(self) -> list[float]:
        """Mean gate score of each expert over the tokens that chose it (0 when none did)."""
        return [g / c if c else 0.0 for c, g in zip(self.token_counts, self.gate_sums, strict=True)]

    @property
    def entropy(self) -> float:
        """Routing entropy of the token-share distribution, in nats (ln E when uniform)."""
        return -sum(p * math.log(p) for p in self.token_share if p > 0)


def _normalise(values: Sequence[float]) -> list[float]:
    total = float(sum(values))
    return [v / total for v in values] if total > 0 else [0.0] * len(values)


class ExpertProfile(_Record):
    """Per-layer expert routing of one model on one dataset (`emmoe profile` writes it)."""

    schema_version: Literal[1] = 1
    model: str
    family: str
    dataset: str
    dataset_hash: str
    tokens: int = Field(ge=0, description="tokens counted (each made top_k choices)")
    top_k: int = Field(gt=0)
    num_experts: int = Field(gt=0)
    include_prompt: bool
    layers: tuple[LayerRouting, ...]
    # the catalog's hash of the dataset file and whether `dataset_hash` equals it (None: a
    # file of the user's own, or a profile written before profiles recorded it)
    dataset_expected_hash: str | None = None
    dataset_verified: bool | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ExpertProfile:
        seen = [r.layer for r in self.layers]
        if seen != sorted(set(seen)):
            raise ValueError(f"layers must be listed once each, in order; got {seen}")
        for r in self.layers:
            if len(r.token_counts) != self.num_experts:
                raise ValueError(
                    f"layer {r.layer}: {len(r.token_counts)} experts, "
                    f"num_experts is {self.num_experts}"
                )
            if sum(r.token_counts) != self.tokens * self.top_k:
                raise ValueError(
                    f"layer {r.layer}: counts sum to {sum(r.token_counts)}, "
                    f"expected tokens * top_k = {self.tokens * self.top_k}"
                )
        return self

    @property
    def layer_indices(self) -> list[int]:
        return [r.layer for r in self.layers]

    def layer(self, index: int) -> LayerRouting:
        for r in self.layers:
            if r.layer == index:
                return r
        raise EmmoeError(f"the profile has no MoE layer {index}; layers: {self.layer_indices}")

    def to_json(self) -> str:
        return dumps_json(self.model_dump(mode="json")) + "\n"

    @classmethod
    def from_json(cls, text: str, *, file: str = "<profile>") -> ExpertProfile:
        try:
            return cls.model_validate_json(text)
        except ValidationError as e:
            raise validation_error(e, file) from None

    def save(self, path: str | os.PathLike[str]) -> Path:
        write_text_atomic(path, self.to_json())
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ExpertProfile:
        data = read_json_object(path, "profile")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise validation_error(e, str(path)) from None


# ---------------------------------------------------------------------------------------------
# Selections

RULE_ALL = "all"


@dataclass(frozen=True)
class ExpertSelection:
    """Which experts train, per MoE decoder layer (ids sorted). Layers not listed train none.

    `rule` says how it was made ("all" means the whole model: no expert masking at all).
    `family` and `num_experts` are None for a file written by another tool (ESFT).
    """

    experts: Mapping[int, tuple[int, ...]]
    rule: str = "file"
    family: str | None = None
    num_experts: int | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        # ESFT lists experts in score order; ours are sorted, so equal selections compare equal.
        for layer, ids in self.experts.items():
            if layer < 0:
                raise EmmoeError(f"layer {layer}: layer indices cannot be negative")
            twice = sorted({e for e in ids if ids.count(e) > 1})
            if twice:
                raise EmmoeError(f"layer {layer}: expert {twice[0]} is listed twice")
        normalised = {k: tuple(sorted(v)) for k, v in sorted(self.experts.items())}
        object.__setattr__(self, "experts", MappingProxyType(normalised))

    # -- constructors ---------------------------------------------------------------------

    @classmethod
    def all(cls, family: MoEFamily, config: Mapping[str, Any]) -> ExpertSelection:
        n = families.num_experts(family, config)
        layers = families.moe_layer_indices(family, config)
        return cls(
            experts={i: tuple(range(n)) for i in layers},
            rule=RULE_ALL,
            family=family.name,
            num_experts=n,
        )

    @classmethod
    def single(cls, expert: int, family: MoEFamily, config: Mapping[str, Any]) -> ExpertSelection:
        """The same expert in every MoE layer (dense layers have no experts and are skipped)."""
        sel = cls(
            experts={i: (expert,) for i in families.moe_layer_indices(family, config)},
            rule=f"single expert={expert}",
            family=family.name,
            num_experts=families.num_experts(family, config),
        )
        sel.validate(family, config)
        return sel

    @classmethod
    def top_k(cls, profile: ExpertProfile, k: int) -> ExpertSelection:
        """Per layer, the k experts chosen by most tokens; ties go to the lower expert id."""
        if not 0 < k <= profile.num_experts:
            raise EmmoeError(f"k must be in 1..{profile.num_experts}, got {k}")
        experts = {r.layer: tuple(sorted(_ranked(r.token_counts)[:k])) for r in profile.layers}
        return cls(
            experts=experts,
            rule=f"top_k k={k} by token count ({_source(profile)})",
            family=profile.family,
            num_experts=profile.num_experts,
        )

    @classmethod
    def esft(
        cls, profile: ExpertProfile, score: Literal["token", "gate"], p: float
    ) -> ExpertSelection:
        """ESFT's rule: per layer, experts by share (descending, ties by lower id); take the
        shortest prefix whose cumulative share reaches `p`."""
        if not 0 < p <= 1:
            raise EmmoeError(f"p must be in (0, 1], got {p}")
        if profile.tokens == 0:
            raise EmmoeError("the profile counted no tokens; nothing to select from")
        experts: dict[int, tuple[int, ...]] = {}
        for r in profile.layers:
            share = r.token_share if score == "token" else r.gate_share
            chosen: list[int] = []
            total = 0.0
            for e in _ranked(share):
                if total >= p - _SHARE_TOLERANCE:
                    break
                chosen.append(e)
                total += share[e]
            experts[r.layer] = tuple(sorted(chosen))
        return cls(
            experts=experts,
            rule=f"esft score={score} p={p} ({_source(profile)})",
            family=profile.family,
            num_experts=profile.num_experts,
        )

    @classmethod
    def explicit(
        cls,
        experts: Mapping[int, Sequence[int]],
        family: MoEFamily | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> ExpertSelection:
        """Experts given by hand; validated when the family and config are known."""
        sel = cls(
            experts={int(k): tuple(int(e) for e in v) for k, v in experts.items()},
            rule="explicit",
            family=family.name if family else None,
            num_experts=families.num_experts(family, config) if family and config else None,
        )
        if family is not None and config is not None:
            sel.validate(family, config)
        return sel

    # -- queries --------------------------------------------------------------------------

    @property
    def is_all(self) -> bool:
        return self.rule == RULE_ALL

    @property
    def layers(self) -> list[int]:
        return list(self.experts)

    def experts_for(self, layer: int) -> tuple[int, ...]:
        """The experts that train in `layer` (empty for a layer the selection leaves out)."""
        return self.experts.get(layer, ())

    def validate(
        self, family: MoEFamily, config: Mapping[str, Any], *, file: str | None = None
    ) -> None:
        """Check the selection against a model: MoE layers only, ids in range, not empty."""
        n = families.num_experts(family, config)
        moe = families.moe_layer_indices(family, config)
        if self.family is not None and self.family != family.name:
            raise InputError(
                f"selection is for family {self.family!r}, the model is {family.name!r}",
                file=file,
                field="family",
            )
        if self.num_experts is not None and self.num_experts != n:
            raise InputError(
                f"selection assumes {self.num_experts} experts, the model has {n}",
                file=file,
                field="num_experts",
            )
        if not any(self.experts.values()):
            raise InputError(
                "the selection is empty: no expert would train", file=file, field="experts"
            )
        for layer, ids in self.experts.items():
            where = f"experts.{layer}"
            if layer not in moe:
                kind = (
                    "a dense layer"
                    if layer < int(config["num_hidden_layers"])
                    else "beyond the last layer"
                )
                raise InputError(
                    f"layer {layer} is {kind} (MoE layers: {moe})", file=file, field=where
                )
            if not ids:
                raise InputError(
                    f"layer {layer} lists no experts (leave the layer out instead)",
                    file=file,
                    field=where,
                )
            for e in ids:
                if not 0 <= e < n:
                    raise InputError(
                        f"layer {layer}: expert {e} is out of range 0..{n - 1}",
                        file=file,
                        field=where,
                    )
        if self.is_all and self.experts != {i: tuple(range(n)) for i in moe}:
            raise InputError(
                "rule 'all' must list every expert of every MoE layer", file=file, field="rule"
            )

    # -- files ----------------------------------------------------------------------------

    def to_json(self) -> str:
        data = {
            "experts": {str(k): list(v) for k, v in self.experts.items()},
            "rule": self.rule,
            "family": self.family,
            "num_experts": self.num_experts,
            "schema_version": self.schema_version,
        }
        return dumps_json(data) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, file: str = "<selection>") -> ExpertSelection:
        """Parse our JSON or ESFT's (`{"experts": {"<layer>": [ids]}, "shared_experts": ...}`)."""
        unknown = sorted(set(data) - _SELECTION_KEYS - set(_ESFT_KEYS))
        if unknown:
            raise InputError("unknown key", file=file, field=unknown[0])
        version = data.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise InputError(
                f"schema_version {version!r} is not supported (this version reads "
                f"{SCHEMA_VERSION})",
                file=file,
                field="schema_version",
            )
        raw = data.get("experts")
        if not isinstance(raw, Mapping):
            raise InputError(
                'must be an object {"<layer>": [expert ids]}', file=file, field="experts"
            )
        experts: dict[int, tuple[int, ...]] = {}
        for key, ids in raw.items():
            field = f"experts.{key}"
            if not (isinstance(key, str) and key.strip().isdigit()):
                raise InputError("layer keys must be non-negative integers", file=file, field=field)
            if not isinstance(ids, list) or not all(_is_int(e) for e in ids):
                raise InputError("must be a list of expert ids (integers)", file=file, field=field)
            experts[int(key)] = tuple(ids)
        for name, kind in (("rule", str), ("family", str), ("num_experts", int)):
            value = data.get(name)
            if value is None:
                continue
            if not isinstance(value, kind) or isinstance(value, bool):
                raise InputError(f"must be {kind.__name__}", file=file, field=name)
        num = data.get("num_experts")
        if num is not None and num <= 0:
            raise InputError("must be positive", file=file, field="num_experts")
        try:
            return cls(
                experts=experts,
                rule=data.get("rule") or "file",
                family=data.get("family"),
                num_experts=num,
            )
        except EmmoeError as e:
            raise InputError(str(e), file=file, field="experts") from None

    @classmethod
    def from_json(cls, text: str, *, file: str = "<selection>") -> ExpertSelection:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"invalid JSON: {e.msg}", file=file, line=e.lineno) from None
        if not isinstance(data, dict):
            raise InputError("a selection must be a JSON object", file=file, line=1)
        return cls.from_dict(data, file=file)

    def save(self, path: str | os.PathLike[str]) -> Path:
        write_text_atomic(path, self.to_json())
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ExpertSelection:
        try:
            return cls.from_dict(read_json_object(path, "selection"), file=str(path))
        except InputError as e:
            raise with_json_line(e, path) from None


_SELECTION_KEYS = {"experts", "rule", "family", "num_experts", "schema_version"}


# ---------------------------------------------------------------------------------------------
# Choosing experts: one entry point for training, `emmoe select` and sweeps

SelectionRule = Literal["all", "single", "top_k", "esft", "explicit", "file"]

# What each rule needs. `model` is the model's family and config, for the rules that read its
# shape; an experiment always names its model, so only `emmoe select` asks for it.
RULE_NEEDS: Mapping[SelectionRule, tuple[str, ...]] = MappingProxyType(
    {
        "all": ("model",),
        "single": ("expert", "model"),
        "top_k": ("k", "profile"),
        "esft": ("p", "profile"),
        "explicit": ("experts",),
        "file": ("file",),
    }
)


def missing_fields(rule: SelectionRule, given: Mapping[str, Any]) -> list[str]:
    """The fields `rule` needs that `given` leaves unset (None or absent), in table order."""
    return [name for name in RULE_NEEDS[rule] if given.get(name) is None]


def select_experts(
    rule: SelectionRule,
    *,
    model: tuple[MoEFamily, Mapping[str, Any]] | None = None,
    expert: int | None = None,
    k: int | None = None,
    p: float | None = None,
    score: Literal["token", "gate"] = "token",
    profile: ExpertProfile | str | os.PathLike[str] | None = None,
    experts: Mapping[int, Sequence[int]] | None = None,
    file: str | os.PathLike[str] | None = None,
    where: Callable[[str], Where] | None = None,
) -> ExpertSelection:
    """The experts `rule` chooses, checked against the model whenever `model` is given.

    all: every expert of every MoE layer; single: `expert` in every MoE layer; top_k: the `k`
    most-routed experts per layer of `profile`; esft: ESFT's cumulative `score` share `p`;
    explicit: `experts` by hand; file: a selection file (ours or ESFT's). `where(name)` says
    where the user wrote each argument (`expert`, `experts.<layer>`, `k`, `p`, `profile`,
    `file`, `model`), so errors name that file, line and field; a selection file's own errors
    name its file and line."""
    given = {"model": model, "expert": expert, "k": k, "p": p, "profile": profile}
    missing = missing_fields(rule, {**given, "experts": experts, "file": file})
    if missing:
        raise InputError(f"rule {rule!r} needs {', '.join(missing)}", field="rule")

    def place(name: str) -> Where:
        return where(name) if where is not None else Where(field=name)

    # a file the user wrote (a selection file, a profile): its own errors name its file and line
    source = file if file is not None else None
    if source is None and profile is not None and not isinstance(profile, ExpertProfile):
        source = profile
    try:
        return _select(rule, model, expert, k, p, score, profile, experts, file)
    except EmmoeError as e:
        raise _located(e, rule, place, None if source is None else str(source)) from None


def _select(
    rule: SelectionRule,
    model: tuple[MoEFamily, Mapping[str, Any]] | None,
    expert: int | None,
    k: int | None,
    p: float | None,
    score: Literal["token", "gate"],
    profile: ExpertProfile | str | os.PathLike[str] | None,
    experts: Mapping[int, Sequence[int]] | None,
    file: str | os.PathLike[str] | None,
) -> ExpertSelection:
    source = None  # the file the selection came from, named by validation errors
    if rule == "all":
        assert model is not None
        chosen = ExpertSelection.all(*model)
    elif rule == "single":
        assert model is not None and expert is not None
        n = families.num_experts(*model)
        if not 0 <= expert < n:
            raise EmmoeError(
                f"expert {expert} is out of range: the model has {n} experts in each MoE "
                f"layer (0..{n - 1})"
            )
        chosen = ExpertSelection.single(expert, *model)
    elif rule == "explicit":
        assert experts is not None
        family, config = model if model is not None else (None, None)
        chosen = ExpertSelection.explicit(experts, family, config)
    elif rule == "file":
        assert file is not None
        source = str(file)
        chosen = ExpertSelection.load(file)
    else:
        assert profile is not None
        if not isinstance(profile, ExpertProfile):
            source = str(profile)
            profile = ExpertProfile.load(profile)
        if rule == "top_k":
            assert k is not None
            chosen = ExpertSelection.top_k(profile, k)
        else:
            assert p is not None
            chosen = ExpertSelection.esft(profile, score, p)
    if model is not None:
        chosen.validate(*model, file=source)
    return chosen


def with_json_line(error: InputError, path: str | os.PathLike[str]) -> InputError:
    """`error` about a field of the JSON file `path`, with the line that field is on."""
    if error.line is not None or error.field is None or error.file != str(path):
        return error
    line = json_field_line(Path(path).read_text(encoding="utf-8"), error.field)
    return InputError(error.reason, file=error.file, line=line, field=error.field)


def _located(
    error: EmmoeError, rule: SelectionRule, place: Callable[[str], Where], file: str | None
) -> InputError:
    """A selection error at the place the user wrote the value to blame: the experiment's
    `selection.expert` line, a flag, a sweep arm, or the line of the selection file itself."""
    if isinstance(error, InputError) and file is not None and error.file == file:
        return with_json_line(error, file)  # the selection or profile file's own field
    message = error.reason if isinstance(error, InputError) else str(error)
    field = error.field if isinstance(error, InputError) else None
    if rule == "explicit":
        return place(field if field and field.startswith("experts.") else "experts").error(message)
    if rule == "single":
        return place("expert").error(message)
    if rule in ("top_k", "esft"):
        knob = "k" if rule == "top_k" else "p"
        if message.startswith(f"{knob} must be"):
            return place(knob).error(message)
        return place("profile").error(f"the profile does not fit the model: {message}")
    return place(rule if rule == "file" else "model").error(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _source(profile: ExpertProfile) -> str:
    return f"profile of {profile.model} on {profile.dataset}"


def _ranked(values: Sequence[float]) -> list[int]:
    """Expert ids by value, highest first; ties go to the lower id (a stated, stable rule)."""
    return sorted(range(len(values)), key=lambda e: (-values[e], e))
