"""Turn the experiment's `selection:` section into a validated `ExpertSelection`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from emmoe_dist.config import SelectionConfig
from emmoe_dist.experts import ExpertProfile, ExpertSelection
from emmoe_dist.families import MoEFamily


def resolve_selection(
    sel: SelectionConfig, family: MoEFamily, config: Mapping[str, Any]
) -> ExpertSelection:
    """Every rule yields one selection, checked against the model before any weight loads."""
    file = None
    if sel.rule == "all":
        chosen = ExpertSelection.all(family, config)
    elif sel.rule == "single":
        assert sel.expert is not None
        chosen = ExpertSelection.single(sel.expert, family, config)
    elif sel.rule in ("top_k", "esft"):
        assert sel.profile is not None
        profile = ExpertProfile.load(sel.profile)
        file = sel.profile
        if sel.rule == "top_k":
            assert sel.k is not None
            chosen = ExpertSelection.top_k(profile, sel.k)
        else:
            assert sel.p is not None
            chosen = ExpertSelection.esft(profile, sel.score, sel.p)
    elif sel.rule == "explicit":
        assert sel.experts is not None
        chosen = ExpertSelection.explicit(sel.experts, family, config)
    else:
        assert sel.file is not None
        file = sel.file
        chosen = ExpertSelection.load(sel.file)
    chosen.validate(family, config, file=file)
    return chosen
