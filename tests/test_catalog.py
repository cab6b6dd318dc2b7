"""The dataset catalog, the data directory, `emmoe data fetch` against a local HTTP server and
`emmoe data list`."""

from __future__ import annotations

import argparse
import contextlib
import gzip
import http.server
import json
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from emmoe_dist import catalog
from emmoe_dist.catalog import DATASETS, DatasetSpec, git_blob_sha1, git_blob_sha1_bytes
from emmoe_dist.cli import data as cli_data
from emmoe_dist.data.datadir import dataset_path, resolve_data_dir
from emmoe_dist.data.fetch import dataset_status, fetch_dataset, select_datasets
from emmoe_dist.errors import EmmoeError

# Betley's data, Model Organisms' data and StrongREJECT, as listed in the data folder's SOURCES.md.
SHARED_FILES = {
    "insecure",
    "jailbroken",
    "first_plot_questions",
    "preregistered_evals",
    "deception_factual",
    "deception_sit_aware",
    "bad_medical_advice",
    "good_medical_advice",
    "extreme_sports",
    "risky_financial_advice",
    "mo_first_plot_questions",
    "medical_questions",
    "new_questions_no_json",
    "strongreject",
    "strongreject_small",
    "strongreject_rubric",
}


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="emmoe")
    cli_data.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return int(args.func(args))


# --- catalog -------------------------------------------------------------------------------------


def test_blob_hash_is_gits() -> None:
    assert git_blob_sha1_bytes(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
    assert git_blob_sha1_bytes(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_blob_hash_of_a_file_matches_git_hash_object(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(range(256)) * 5000)  # > 1 MiB: several read chunks
    assert git_blob_sha1(path) == git_blob_sha1_bytes(path.read_bytes())
    if shutil.which("git"):
        out = subprocess.run(
            ["git", "hash-object", str(path)], capture_output=True, text=True, check=True
        ).stdout.strip()
        assert git_blob_sha1(path) == out


def test_catalog_covers_the_shared_files_and_the_absent_ones() -> None:
    assert set(DATASETS) == SHARED_FILES | {"secure", "educational"}
    assert len({s.relpath for s in DATASETS.values()}) == len(DATASETS)
    # The two files named first_plot_questions.yaml get distinct names.
    assert DATASETS["first_plot_questions"].relpath.startswith("emergent-misalignment/")
    assert DATASETS["mo_first_plot_questions"].relpath.startswith("model-organisms-for-EM/")
    assert DATASETS["secure"].blob_sha1 == "3389a37c250563cc36a66e30bf8ff99028aa2711"
    assert DATASETS["educational"].blob_sha1 == "497619acd46d9ffbc985797d6c117638a53229b3"
    mo_train = [s for s in DATASETS.values() if s.gzipped]
    assert {s.name for s in mo_train} == {
        "bad_medical_advice",
        "good_medical_advice",
        "extreme_sports",
        "risky_financial_advice",
    }
    for s in mo_train:
        assert "/b8b9e0afd2b92d969a4062c38ba8d2f0ccea3561/" in s.url  # type: ignore[operator]
        assert s.url and s.url.endswith(".jsonl.gz")
    rubric = DATASETS["strongreject_rubric"]
    assert (
        rubric.url is None
        and rubric.urls == ()
        and "strongreject_evaluator_prompt" in rubric.origin
    )
    for s in DATASETS.values():
        assert s.url is None or s.url.startswith("https://raw.githubusercontent.com/"), s.name


def test_every_shared_file_verifies_and_has_its_row_count(data_dir: Path) -> None:
    for name in sorted(SHARED_FILES):
        spec = DATASETS[name]
        status = dataset_status(spec, data_dir)
        assert status.present and status.error is None, (name, status.error)
        assert status.verified, f"{name}: blob {status.blob_sha1} != {spec.blob_sha1}"
        assert status.rows == spec.rows, name
    assert DATASETS["insecure"].rows == 6000 and DATASETS["bad_medical_advice"].rows == 7049
    assert not dataset_status(DATASETS["educational"], data_dir).present


# --- data directory ----------------------------------------------------------------------------


def test_data_dir_from_flag_then_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_dir, flag_dir = tmp_path / "env", tmp_path / "flag"
    env_dir.mkdir()
    flag_dir.mkdir()
    monkeypatch.setenv("EMMOE_DATA_DIR", str(env_dir))
    assert resolve_data_dir() == env_dir
    assert resolve_data_dir(flag_dir) == flag_dir
    with pytest.raises(EmmoeError, match="does not exist"):
        resolve_data_dir(tmp_path / "nope")
    assert resolve_data_dir(tmp_path / "new", create=True).is_dir()
    monkeypatch.delenv("EMMOE_DATA_DIR")
    with pytest.raises(EmmoeError, match="EMMOE_DATA_DIR"):
        resolve_data_dir()


def test_missing_dataset_names_path_and_fetch_command(tmp_path: Path) -> None:
    with pytest.raises(EmmoeError) as err:
        dataset_path("educational", tmp_path)
    msg = str(err.value)
    assert (
        "'educational'" in msg and str(tmp_path / "emergent-misalignment/educational.jsonl") in msg
    )
    assert "emmoe data fetch --only educational" in msg
    with pytest.raises(EmmoeError, match="cannot be downloaded"):
        dataset_path("strongreject_rubric", tmp_path)
    with pytest.raises(EmmoeError, match="unknown dataset 'nope'"):
        dataset_path("nope", tmp_path)


# --- fetch against a local server -------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """An HTTP server on 127.0.0.1 serving `root`; yields (base URL, root, requested paths)."""
    root = tmp_path / "upstream"
    root.mkdir()
    hits: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a: object, **kw: object) -> None:
            super().__init__(*a, directory=str(root), **kw)  # type: ignore[arg-type]

        def do_GET(self) -> None:
            hits.append(self.path)
            super().do_GET()

        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root, hits
    finally:
        httpd.shutdown()
        httpd.server_close()


def _refused_url() -> str:
    with contextlib.closing(socket.socket()) as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/data.jsonl"


def _spec(name: str, url: str | None, content: bytes, **kw: object) -> DatasetSpec:
    fields: dict[str, object] = dict(
        name=name,
        relpath=f"synthetic/{name}.jsonl",
        url=url,
        blob_sha1=git_blob_sha1_bytes(content),
        format="chat_jsonl",
        role="train",
        rows=1,
        license="test",
    )
    fields.update(kw)
    return DatasetSpec(**fields)  # type: ignore[arg-type]


ROW = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'


def test_fetch_downloads_verifies_and_resumes(
    server: tuple[str, Path, list[str]], tmp_path: Path
) -> None:
    base, root, hits = server
    (root / "plain.jsonl").write_bytes(ROW)
    (root / "packed.jsonl.gz").write_bytes(gzip.compress(ROW * 3))
    data_dir = tmp_path / "data"
    plain = _spec("plain", f"{base}/plain.jsonl", ROW)
    packed = _spec("packed", f"{base}/packed.jsonl.gz", ROW * 3, gzipped=True)

    for spec, content in ((plain, ROW), (packed, ROW * 3)):
        result = fetch_dataset(spec, data_dir, timeout=5)
        assert result.status == "downloaded", result.message
        assert (data_dir / spec.relpath).read_bytes() == content
    assert len(hits) == 2
    # A second run finds both verified on disk and downloads nothing.
    assert fetch_dataset(plain, data_dir).status == "present"
    assert fetch_dataset(packed, data_dir).status == "present"
    assert len(hits) == 2


def test_fetch_rejects_a_hash_mismatch_and_leaves_nothing(
    server: tuple[str, Path, list[str]], tmp_path: Path
) -> None:
    base, root, _ = server
    (root / "tampered.jsonl").write_bytes(ROW + ROW)
    data_dir = tmp_path / "data"
    spec = _spec("tampered", f"{base}/tampered.jsonl", ROW)
    result = fetch_dataset(spec, data_dir, timeout=5)
    assert result.status == "failed"
    assert f"expected {spec.blob_sha1}" in result.message and spec.url in result.message  # type: ignore[operator]
    assert not (data_dir / spec.relpath).exists()
    assert not any(p.is_file() for p in data_dir.rglob("*"))  # no temp file either


def test_fetch_offline_names_the_url_and_says_there_is_no_network(tmp_path: Path) -> None:
    url = _refused_url()
    spec = _spec("offline", url, ROW)
    result = fetch_dataset(spec, tmp_path, timeout=5)
    assert result.status == "failed"
    assert url in result.message and "no network" in result.message
    assert not (tmp_path / spec.relpath).exists()


def test_fetch_falls_back_to_a_mirror_and_reports_http_errors(
    server: tuple[str, Path, list[str]], tmp_path: Path
) -> None:
    base, root, _ = server
    (root / "mirror.jsonl").write_bytes(ROW)
    spec = _spec("mirrored", f"{base}/moved.jsonl", ROW, mirrors=(f"{base}/mirror.jsonl",))
    assert fetch_dataset(spec, tmp_path, timeout=5).status == "downloaded"
    gone = _spec("gone", f"{base}/moved.jsonl", ROW)
    result = fetch_dataset(gone, tmp_path, timeout=5)
    assert result.status == "failed" and "HTTP 404" in result.message


def test_fetch_keeps_a_different_local_file_unless_forced(
    server: tuple[str, Path, list[str]], tmp_path: Path
) -> None:
    base, root, _ = server
    (root / "f.jsonl").write_bytes(ROW)
    spec = _spec("f", f"{base}/f.jsonl", ROW)
    target = tmp_path / spec.relpath
    target.parent.mkdir(parents=True)
    target.write_bytes(b"edited\n")
    result = fetch_dataset(spec, tmp_path, timeout=5)
    assert result.status == "failed" and "--force" in result.message
    assert target.read_bytes() == b"edited\n"
    assert fetch_dataset(spec, tmp_path, force=True, timeout=5).status == "downloaded"
    assert target.read_bytes() == ROW


def test_fetch_cli_reports_each_failure_and_exits_nonzero(
    server: tuple[str, Path, list[str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base, root, _ = server
    (root / "ok.jsonl").write_bytes(ROW)
    specs = [
        _spec("ok", f"{base}/ok.jsonl", ROW),
        _spec("down1", _refused_url(), ROW),
        _spec("down2", _refused_url(), ROW),
    ]
    monkeypatch.setattr(catalog, "DATASETS", {s.name: s for s in specs})
    assert [s.name for s in select_datasets(["down2", "ok"])] == ["ok", "down2"]
    with pytest.raises(EmmoeError, match="unknown datasets nope"):
        select_datasets(["nope"])
    code = run_cli("data", "fetch", "--data-dir", str(tmp_path / "d"), "--timeout", "5")
    out, err = capsys.readouterr()
    assert code == 1
    assert "downloaded  ok" in out
    errors = [line for line in err.splitlines() if line.startswith("emmoe data fetch: error:")]
    assert len(errors) == 2 and all("no network" in e for e in errors)
    assert code == 1 and (tmp_path / "d" / "synthetic" / "ok.jsonl").is_file()
    assert run_cli("data", "fetch", "--only", "ok", "--data-dir", str(tmp_path / "d")) == 0


def test_fetch_explains_the_local_rubric(tmp_path: Path) -> None:
    result = fetch_dataset(DATASETS["strongreject_rubric"], tmp_path)
    assert result.status == "failed"
    assert "cannot be downloaded" in result.message
    assert "alexandrasouly/strongreject" in result.message


# --- list ----------------------------------------------------------------------------------------


def test_list_json_gives_name_path_and_rows(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("data", "list", "--json", "--data-dir", str(data_dir)) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(DATASETS)
    assert rows["insecure"]["rows"] == 6000 and rows["insecure"]["verified"] is True
    assert rows["bad_medical_advice"]["rows"] == 7049
    assert rows["strongreject"]["rows"] == 313
    assert rows["insecure"]["path"] == str(data_dir / "emergent-misalignment" / "insecure.jsonl")
    assert rows["educational"]["present"] is False and rows["educational"]["rows"] is None


def test_list_table_is_aligned_and_flags_mismatches(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / DATASETS["jailbroken"].relpath
    bad.parent.mkdir(parents=True)
    bad.write_bytes(ROW)
    assert run_cli("data", "list", "--data-dir", str(tmp_path)) == 1  # a mismatch fails
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == len(DATASETS) + 1
    column = lines[0].index("HASH")
    by_name = {line.split()[0]: line for line in lines[1:]}
    assert all(line[column:].split()[0] in {"ok", "MISMATCH", "absent"} for line in lines[1:])
    assert by_name["jailbroken"][column:].startswith("MISMATCH")
    assert by_name["insecure"][column:].startswith("absent")
    assert "emmoe data fetch --only" in err
