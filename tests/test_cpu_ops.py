"""The first CPU training run says it is compiling DeepSpeed's communication op, and for how
long; a machine that has it says nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from emmoe_dist.parallel.cpu_ops import build_cpu_comm_op


class FakeBuilder:
    """An op builder whose 'build' writes the extension where torch would put it."""

    NAME = "emmoe_test_op"

    def __init__(self, root: Path) -> None:
        self.root, self.loads = root, 0

    def load(self, verbose: bool = False) -> None:
        self.loads += 1
        folder = self.root / self.NAME
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{self.NAME}.so").write_bytes(b"\x7fELF")


def test_the_first_build_is_announced_and_timed_later_ones_are_silent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    builder, said = FakeBuilder(tmp_path), []
    seconds = build_cpu_comm_op(said.append, builder)
    assert seconds is not None and builder.loads == 1
    assert len(said) == 2
    assert "compiling DeepSpeed's CPU communication op emmoe_test_op" in said[0]
    assert "about 3 minutes" in said[0] and said[1].startswith("[emmoe] built emmoe_test_op in ")
    said.clear()
    assert build_cpu_comm_op(said.append, builder) is None and said == []
    assert builder.loads == 2  # loaded, not built
