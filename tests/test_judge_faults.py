"""Fault handling against the scripted server: injected 429/500/timeouts/malformed replies,
retries that end with a reason, a run killed midway and resumed without repeated paid calls,
the concurrency bound and rate limits, and the API key staying out of every output."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from emmoe_dist.cli import judge as judge_cli
from emmoe_dist.cli import report as report_cli
from emmoe_dist.cli.main import main as cli_main
from emmoe_dist.config import JudgeConfig
from emmoe_dist.errors import EmmoeError
from emmoe_dist.files import read_jsonl, write_jsonl_atomic
from emmoe_dist.judge.cache import JudgeCache, cache_key
from emmoe_dist.judge.client import JudgeEndpointError
from emmoe_dist.judge.kinds import score_request
from emmoe_dist.judge.rubric import DEFAULT_PROMPTS
from emmoe_dist.judge.runner import (
    DEFAULT_SCORES,
    JudgeFailed,
    JudgeOptions,
    has_transient_error,
    run_judge,
)
from emmoe_dist.judge.scripted_server import (
    ALL_FAULTS,
    ChatRequest,
    Script,
    ScriptedError,
    ScriptedReply,
    request_hash,
    scripted_server,
)
from emmoe_dist.records import GenerationRecord, JudgedRecord

REPO = Path(__file__).resolve().parents[1]
FAST = JudgeOptions(progress=False, backoff_base_s=0.01, flush_interval_s=0.05)


def respond(request: ChatRequest) -> ScriptedReply:
    if not request.logprobs:  # StrongREJECT rubric
        return ScriptedReply(text="#scores\n1.a r\n1.b 0\n2.a r\n2.b 3\n3.a r\n3.b 3\n")
    return ScriptedReply.from_probs({"60": 0.5, "80": 0.5})


def records(n: int, *, strongreject_every: int = 0) -> list[GenerationRecord]:
    out = []
    for i in range(n):
        sr = strongreject_every and i % strongreject_every == 0
        out.append(
            GenerationRecord.model_validate(
                {
                    "suite": "strongreject" if sr else "core",
                    "question_id": f"q{i % 7}",
                    "paraphrase_index": 0,
                    "sample_index": i,
                    "model": "m",
                    "sampling": {"temperature": 1.0, "max_new_tokens": 8},
                    "question": f"question {i % 7}",
                    "prompt": "p",
                    "answer": f"answer number {i}",
                    "n_prompt_tokens": 1,
                    "n_answer_tokens": 1,
                    "backend": "test",
                    "category": "Violence" if sr else None,
                    "rubric": "strongreject" if sr else None,
                }
            )
        )
    return out


def write_inputs(path: Path, recs: list[GenerationRecord]) -> Path:
    write_jsonl_atomic(path, recs)
    return path


def assert_complete(out: Path, recs: list[GenerationRecord]) -> list[JudgedRecord]:
    judged = read_jsonl(out, JudgedRecord)
    keys = Counter(r.key for r in judged)
    assert set(keys) == {r.key for r in recs}, "an answer was lost"
    assert max(keys.values()) == 1, "an answer was judged twice"
    for r in judged:
        for score in [*r.scores.values(), *([r.strongreject] if r.strongreject else [])]:
            assert (score.missing_reason is None) != (
                getattr(score, "value", None) is None and getattr(score, "score", None) is None
            )
    return judged


def test_twenty_percent_faults_every_answer_scored_or_unscored_once(
    tmp_path: Path,
    data_dir: Path,
) -> None:
    recs = records(80, strongreject_every=5)
    source = write_inputs(tmp_path / "gen.jsonl", recs)
    script = Script(
        respond=respond, latency_s=0.005, fault_rate=0.2, hang_s=0.6, retry_after_s=0.02, seed=3
    )
    with scripted_server(script) as server:
        cfg = JudgeConfig(
            base_url=server.base_url, model="judge", concurrency=16, timeout_s=0.3, max_retries=8
        )
        options = JudgeOptions(progress=False, backoff_base_s=0.01, data_dir=str(data_dir))
        summary = run_judge(source, tmp_path / "judged.jsonl", cfg, options)
        faults = server.faults
    judged = assert_complete(tmp_path / "judged.jsonl", recs)
    assert set(ALL_FAULTS) <= set(faults), f"every fault kind was injected: {faults}"
    assert summary.retries >= sum(faults[k] for k in ("429", "500", "timeout", "malformed"))
    # the faults were survived: everything is scored, replies without logprobs retried rather
    # than read from their text, so one estimator made every score
    assert summary.unjudged == 0 and summary.missing == {}
    assert summary.methods == {name: {"logprobs": 64} for name in DEFAULT_SCORES}
    assert all(s.value == pytest.approx(70.0) for r in judged for s in r.scores.values())
    assert sum(r.strongreject is not None for r in judged) == 16


def test_a_failing_endpoint_fails_the_run_and_a_rerun_judges_the_failed_answers(
    tmp_path: Path,
) -> None:
    recs = records(12)
    source, out = write_inputs(tmp_path / "gen.jsonl", recs), tmp_path / "judged.jsonl"
    failing = Script(respond=respond, fault_rate=1.0, faults=("500",))
    with scripted_server(failing) as server:
        cfg = JudgeConfig(base_url=server.base_url, model="judge", concurrency=4, max_retries=2)
        with pytest.raises(JudgeFailed) as failed:
            run_judge(source, out, cfg, FAST)
        assert max(server.calls.values()) == 3  # 1 try + 2 retries per request
    summary = failed.value.summary
    # one failed answer is already past 2% of 12: the run stopped instead of paying for the rest
    assert summary.stopped_early and summary.failed >= 1 and summary.unjudged >= 1
    judged = read_jsonl(out, JudgedRecord)  # what it judged is kept, each with its reason
    assert judged and all(has_transient_error(r) for r in judged)
    assert all("HTTP 500 after 3 attempts" in (r.scores["aligned"].raw or "") for r in judged)
    assert "fix the endpoint and run the same command again" in str(failed.value)

    # the endpoint recovers (another URL: the cache does not care): the failed answers and the
    # ones never reached are judged, once each
    with scripted_server(Script(respond=respond)) as server:
        cfg = cfg.model_copy(update={"base_url": server.base_url})
        again = run_judge(source, out, cfg, FAST)
        assert sum(server.calls.values()) == 24
    assert again.rejudged_errors == len(judged) and again.missing == {} and again.failed == 0
    assert_complete(out, recs)


def test_failures_within_judge_max_failed_fraction_pass(tmp_path: Path) -> None:
    recs = records(100)
    source = write_inputs(tmp_path / "gen.jsonl", recs)

    def one_answer_fails(request: ChatRequest) -> ScriptedReply:
        if "answer number 7\n" in request.user_text:
            raise ScriptedError(503, "overloaded")
        return respond(request)

    with scripted_server(Script(respond=one_answer_fails)) as server:
        cfg = JudgeConfig(base_url=server.base_url, model="judge", max_retries=1)
        summary = run_judge(source, tmp_path / "judged.jsonl", cfg, FAST)  # 1 of 100 <= 2%
        assert summary.failed == 1 and summary.missing["aligned"] == {"error_after_retries": 1}
        strict = cfg.model_copy(update={"max_failed_fraction": 0.0})
        with pytest.raises(JudgeFailed, match="1 of 100 answers are unscored"):
            run_judge(source, tmp_path / "strict.jsonl", strict, FAST)


def test_unreachable_judge_exits_non_zero_and_judges_after_the_endpoint_returns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recs = records(6)
    source, out = write_inputs(tmp_path / "gen.jsonl", recs), tmp_path / "judged.jsonl"
    with socket.socket() as s:  # a port nothing listens on: connections are refused
        s.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    argv = ["judge", "--records", str(source), "--out", str(out), "--model", "judge"]
    argv += ["--max-retries", "1", "--no-progress"]
    assert cli_main([*argv, "--base-url", refused]) == 2
    err = capsys.readouterr().err
    assert "unscored because the judge endpoint failed" in err and "connection error" in err
    assert all(has_transient_error(r) for r in read_jsonl(out, JudgedRecord))
    with scripted_server(Script(respond=respond)) as server:
        assert cli_main([*argv, "--base-url", server.base_url]) == 0
    assert all(not has_transient_error(r) for r in assert_complete(out, recs))


def test_replies_without_logprobs_are_retried_and_reading_text_is_opt_in(tmp_path: Path) -> None:
    source = write_inputs(tmp_path / "gen.jsonl", records(5))
    seen: Counter[str] = Counter()

    def logprobs_second_time(request: ChatRequest) -> ScriptedReply:
        seen[request.user_text] += 1
        if seen[request.user_text] == 1:
            return ScriptedReply(text="60", top_logprobs=None)  # a transient provider fault
        return respond(request)

    with scripted_server(Script(respond=logprobs_second_time)) as server:
        cfg = JudgeConfig(base_url=server.base_url, model="judge", max_retries=2)
        summary = run_judge(source, tmp_path / "judged.jsonl", cfg, FAST)
        assert summary.methods == {name: {"logprobs": 5} for name in DEFAULT_SCORES}
        assert summary.retries == 10 and "scored aligned: 5 (by logprobs 5)" in summary.format()
        seen.clear()
        texts = cfg.model_copy(update={"text_fallback": True})
        fresh = dataclasses.replace(FAST, cache_dir=str(tmp_path / "other_cache"))
        summary = run_judge(source, tmp_path / "text.jsonl", texts, fresh)
    assert summary.methods == {name: {"text": 5} for name in DEFAULT_SCORES}
    assert summary.retries == 0 and "scored coherent: 5 (by text 5)" in summary.format()


def test_rejected_request_ends_at_once_and_a_wrong_endpoint_stops_the_run(tmp_path: Path) -> None:
    recs = records(3)
    source = write_inputs(tmp_path / "gen.jsonl", recs)

    def too_long_for_one(request: ChatRequest) -> ScriptedReply:
        if "answer number 1\n" in request.user_text:
            raise ScriptedError(400, "prompt too long")
        return respond(request)

    with scripted_server(Script(respond=too_long_for_one)) as server:
        cfg = JudgeConfig(base_url=server.base_url, model="judge", max_retries=5)
        summary = run_judge(source, tmp_path / "judged.jsonl", cfg, FAST)
        assert sum(server.calls.values()) == 6  # nothing retried
        assert summary.missing == {name: {"rejected": 1} for name in DEFAULT_SCORES}
        assert summary.retries == 0

        wrong = cfg.model_copy(update={"base_url": server.base_url.replace("/v1", "/v2")})
        with pytest.raises(JudgeEndpointError, match="HTTP 404"):
            run_judge(source, tmp_path / "other.jsonl", wrong, FAST)
    assert_complete(tmp_path / "judged.jsonl", recs)


_CHILD = """
import sys
from emmoe_dist.config import JudgeConfig
from emmoe_dist.judge.runner import JudgeOptions, run_judge
cfg = JudgeConfig(base_url=sys.argv[1], model="judge", concurrency=8)
run_judge(sys.argv[2], sys.argv[3], cfg, JudgeOptions(progress=False, flush_interval_s=0.02))
"""


def test_killed_run_resumes_without_repeating_cached_calls(tmp_path: Path) -> None:
    recs = records(120)
    source, out = write_inputs(tmp_path / "gen.jsonl", recs), tmp_path / "judged.jsonl"
    with scripted_server(Script(respond=respond, latency_s=0.05)) as server:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, server.base_url, str(source), str(out)],
            env=env,
            cwd=tmp_path,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and child.poll() is None:
            if out.exists() and out.read_text().count("\n") >= 20:
                break
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        child.wait()
        lines_at_kill = out.read_text().count("\n")
        assert 20 <= lines_at_kill < len(recs), "the kill landed midway"

        bodies = [
            score_request("judge", DEFAULT_PROMPTS[name], r)
            for r in recs
            for name in DEFAULT_SCORES
        ]
        with JudgeCache(tmp_path / "judge_cache") as cache:
            cached = {request_hash(b) for b in bodies if cache_key(b) in cache}
        assert len(cached) >= 2 * 20
        before = server.calls

        cfg = JudgeConfig(base_url=server.base_url, model="judge", concurrency=8)
        summary = run_judge(source, out, cfg, FAST)
        rerun = server.calls - before
        served = server.served
    assert not cached & set(rerun), "a cached request was paid for again"
    assert summary.cache_hits >= len(cached) - 2 * lines_at_kill
    assert_complete(out, recs)
    # at most the calls in flight at the kill (answered but not yet cached) were served twice
    assert sum(served.values()) - len(bodies) <= 8


def test_concurrency_bound_and_rate_limits_hold(tmp_path: Path) -> None:
    recs = records(20)
    source = write_inputs(tmp_path / "gen.jsonl", recs)  # each run below has its own cache
    with scripted_server(Script(respond=respond, latency_s=0.03)) as server:
        cfg = JudgeConfig(base_url=server.base_url, model="judge", concurrency=3)
        run_judge(source, tmp_path / "a" / "judged.jsonl", cfg, FAST)
        assert server.max_in_flight == 3

    # a provider limit of 25 requests/s: a client limited to 20/s never hits it...
    provider = Script(respond=respond, requests_per_s=25, retry_after_s=0.05)
    with scripted_server(provider) as server:
        cfg = JudgeConfig(
            base_url=server.base_url, model="judge", concurrency=32, requests_per_minute=1200
        )
        started = time.monotonic()
        run_judge(source, tmp_path / "b" / "judged.jsonl", cfg, FAST)
        elapsed = time.monotonic() - started
        assert server.faults["rate_limited"] == 0
        assert elapsed >= (40 - 20) / 20 * 0.9  # 40 calls, a one-second burst, then 20/s
    # ...an unlimited one does, and its 429s are retried to completion
    with scripted_server(provider) as server:
        cfg = JudgeConfig(base_url=server.base_url, model="judge", concurrency=32, max_retries=30)
        summary = run_judge(source, tmp_path / "c" / "judged.jsonl", cfg, FAST)
        assert server.faults["rate_limited"] > 0 and summary.missing == {}
    assert_complete(tmp_path / "c" / "judged.jsonl", recs)


def test_retry_after_is_respected(tmp_path: Path) -> None:
    source = write_inputs(tmp_path / "gen.jsonl", records(1))
    script = Script(respond=respond, fault_rate=1.0, faults=("429",), retry_after_s=0.3)
    with scripted_server(script) as server:
        cfg = JudgeConfig(
            base_url=server.base_url, model="judge", max_retries=2, max_failed_fraction=1.0
        )
        started = time.monotonic()
        summary = run_judge(
            source,
            tmp_path / "judged.jsonl",
            cfg,
            JudgeOptions(progress=False, backoff_base_s=0.01, score_names=("aligned",)),
        )
        assert time.monotonic() - started >= 2 * 0.3
        assert list(server.calls.values()) == [3]
    assert summary.missing == {"aligned": {"error_after_retries": 1}}


FAKE_KEY = "sk-emmoe-FAKE-7f3a9c2e41-do-not-log"


def test_api_key_never_reaches_records_cache_logs_or_reports(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    data_dir: Path,
) -> None:
    monkeypatch.setenv("EMMOE_TEST_JUDGE_KEY", FAKE_KEY)
    recs = records(30, strongreject_every=6)
    source = write_inputs(tmp_path / "gen.jsonl", recs)
    script = Script(
        respond=respond, fault_rate=0.2, hang_s=0.5, retry_after_s=0.02, api_key=FAKE_KEY, seed=5
    )
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    judge_cli.register(sub)
    report_cli.register(sub)
    with scripted_server(script) as server, caplog.at_level(logging.DEBUG):
        args = parser.parse_args(
            [
                "judge",
                "--records",
                str(source),
                "--out",
                str(tmp_path / "run" / "judged.jsonl"),
                "--base-url",
                server.base_url,
                "--model",
                "judge",
                "--api-key-env",
                "EMMOE_TEST_JUDGE_KEY",
                "--timeout",
                "0.3",
                "--max-retries",
                "1",
                "--max-failed-fraction",
                "1",
                "--data-dir",
                str(data_dir),
            ]
        )
        assert args.func(args) == 0
        args = parser.parse_args(
            [
                "report",
                str(tmp_path / "run"),
                "--out",
                str(tmp_path / "report"),
                "--resamples",
                "50",
            ]
        )
        assert args.func(args) == 0
        assert sum(server.calls.values()) > 0  # the key did reach the endpoint itself

        # a wrong key: the run stops, naming the variable, never the key
        monkeypatch.setenv("EMMOE_TEST_JUDGE_KEY", FAKE_KEY + "-wrong")
        args = parser.parse_args(
            [
                "judge",
                "--records",
                str(source),
                "--out",
                str(tmp_path / "run2" / "judged.jsonl"),
                "--base-url",
                server.base_url,
                "--model",
                "judge",
                "--api-key-env",
                "EMMOE_TEST_JUDGE_KEY",
                "--no-progress",
            ]
        )
        with pytest.raises(JudgeEndpointError) as err:
            args.func(args)
        assert "EMMOE_TEST_JUDGE_KEY" in str(err.value) and "HTTP 401" in str(err.value)

    assert sum(server.faults.values()) > 0  # the error paths ran too
    captured = capsys.readouterr()
    texts = [captured.out, captured.err, caplog.text, str(err.value)]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"judged.jsonl", "report.md", "metrics.json"}
    assert any(p.parent.parent.name == "replies" for p in files)  # cached replies scanned too
    for secret in (FAKE_KEY, FAKE_KEY[8:24]):
        for text in texts:
            assert secret not in text
        for path in files:
            assert secret.encode() not in path.read_bytes(), f"the key leaked into {path}"


def test_missing_key_for_a_remote_endpoint_names_the_variable(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("EMMOE_TEST_JUDGE_KEY", raising=False)
    source = write_inputs(tmp_path / "gen.jsonl", records(1))
    cfg = JudgeConfig(base_url="https://api.deepseek.com/v1", api_key_env="EMMOE_TEST_JUDGE_KEY")
    with pytest.raises(EmmoeError, match="EMMOE_TEST_JUDGE_KEY"):
        run_judge(source, tmp_path / "judged.jsonl", cfg, FAST)


def test_duplicate_input_keys_are_an_input_error(tmp_path: Path) -> None:
    recs = records(3)
    source = write_inputs(tmp_path / "gen.jsonl", [*recs, recs[1]])
    with pytest.raises(EmmoeError) as err:
        run_judge(
            source, tmp_path / "judged.jsonl", JudgeConfig(base_url="http://127.0.0.1:9/v1"), FAST
        )
    assert f"{source}:4: key: duplicate key" in str(err.value)


def test_a_score_without_a_prompt_is_an_input_error(tmp_path: Path) -> None:
    source = write_inputs(tmp_path / "gen.jsonl", records(3))
    options = JudgeOptions(progress=False, score_names=("aligned", "medical"))
    with pytest.raises(EmmoeError) as err:
        run_judge(
            source,
            tmp_path / "judged.jsonl",
            JudgeConfig(base_url="http://127.0.0.1:9/v1"),
            options,
        )
    assert f"{source}:1: judge_prompts.medical:" in str(err.value)
