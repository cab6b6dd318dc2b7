"""A scripted (mock) OpenAI-compatible judge server for tests, benchmarks and the CPU demo.

It speaks real HTTP on 127.0.0.1 (`POST /v1/chat/completions`, with `logprobs` and
`top_logprobs`), but its answers come from a script: a function from request to reply, plus
simulated latency, an optional rate limit and injected faults (429 with Retry-After, 500,
hangs past the client's timeout, malformed JSON, replies without logprobs). **Its scores are
scripted, never a judgment**: use it to exercise the pipeline, not to measure a model.

    with scripted_server(Script(respond=my_rules, latency_s=0.2)) as server:
        ...  # point the judge at server.base_url; server.calls counts requests per body hash

Run `python -m emmoe_dist.judge.scripted_server --port 8000` to serve `hash_script` (scores
derived from a hash of the answer text) for a manual demo.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

# Every reply carries this `system_fingerprint`: judged records remember that their scores are
# mock ones, and reports label them "MOCK JUDGE - not judgments".
MOCK_FINGERPRINT = "emmoe-scripted-mock-judge"
SCRIPTED_MODEL = "scripted-judge"  # the model name the project's own commands give it

FaultKind = Literal["429", "500", "timeout", "malformed", "no_logprobs"]
ALL_FAULTS: tuple[FaultKind, ...] = ("429", "500", "timeout", "malformed", "no_logprobs")


def request_hash(body: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a request body: how the server tells repeated calls."""
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ChatRequest:
    """The parts of a chat-completions request a script looks at (plus the raw body)."""

    model: str
    messages: tuple[tuple[str, str], ...]  # (role, content)
    logprobs: bool
    top_logprobs: int
    max_tokens: int | None
    body: Mapping[str, Any]

    @property
    def user_text(self) -> str:
        """The last user message: with the judge's prompts, the one holding the answer."""
        return next((c for r, c in reversed(self.messages) if r == "user"), "")

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> ChatRequest:
        messages = tuple(
            (str(m.get("role", "")), _content_text(m.get("content")))
            for m in body.get("messages", [])
        )
        return cls(
            model=str(body.get("model", "")),
            messages=messages,
            logprobs=bool(body.get("logprobs")),
            top_logprobs=int(body.get("top_logprobs") or 0),
            max_tokens=body.get("max_tokens") or body.get("max_completion_tokens"),
            body=body,
        )


def _content_text(content: Any) -> str:
    if isinstance(content, list):  # content parts
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


@dataclass(frozen=True)
class ScriptedReply:
    """What the scripted judge says: a text and the first token's top logprobs (or none)."""

    text: str
    top_logprobs: tuple[tuple[str, float], ...] | None = None

    @classmethod
    def from_probs(cls, probs: Mapping[str | int, float], text: str | None = None) -> ScriptedReply:
        """Top logprobs from token probabilities (most probable first); text defaults to the
        most probable token."""
        ranked = sorted(((str(t), p) for t, p in probs.items()), key=lambda tp: -tp[1])
        top = tuple((t, math.log(p)) for t, p in ranked if p > 0)
        return cls(text=text if text is not None else top[0][0], top_logprobs=top)


class ScriptedError(Exception):
    """Raised by a responder to answer with an HTTP error, e.g. 400 for an oversized prompt."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


Responder = Callable[[ChatRequest], ScriptedReply]


@dataclass(frozen=True)
class Script:
    respond: Responder
    latency_s: float = 0.0
    fault_rate: float = 0.0  # share of requests answered with one of `faults`
    faults: Sequence[FaultKind] = ALL_FAULTS
    retry_after_s: float = 0.05  # sent with injected and rate-limit 429s
    hang_s: float = 5.0  # a "timeout" fault holds the request this long: past the client timeout
    requests_per_s: float | None = None  # above this rate, answer 429 (a provider's limit)
    api_key: str | None = None  # when set, other bearer tokens get 401
    seed: int = 0


@dataclass
class _Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    calls: Counter[str] = field(default_factory=Counter)
    served: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0
    max_in_flight: int = 0


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # hundreds of concurrent clients connect at once
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], script: Script) -> None:
        super().__init__(address, _Handler)
        self.script = script
        self.tally = _Tally()
        self.rng = random.Random(script.seed)
        self.bucket_level = script.requests_per_s or 0.0
        self.bucket_time = time.monotonic()

    def draw(self) -> tuple[FaultKind | None, float | None]:
        """Under the lock: the injected fault (if any) and a rate-limit wait (if over the limit)."""
        script = self.script
        with self.tally.lock:
            if script.requests_per_s:
                now = time.monotonic()
                self.bucket_level = min(
                    script.requests_per_s,
                    self.bucket_level + (now - self.bucket_time) * script.requests_per_s,
                )
                self.bucket_time = now
                if self.bucket_level < 1:
                    return None, (1 - self.bucket_level) / script.requests_per_s
                self.bucket_level -= 1
            if script.fault_rate and self.rng.random() < script.fault_rate:
                return self.rng.choice(list(script.faults)), None
        return None, None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the client reuses its connections
    # headers and body go out as two writes: with Nagle on, the body waits ~40 ms for the
    # client's delayed ACK, a latency no real endpoint adds
    disable_nagle_algorithm = True
    timeout = 30  # idle keep-alive connections close after this
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # tests and benchmarks would drown in access lines

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            self._send_json(404, {"error": {"message": f"no route {self.path}"}})
            return
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            self._send_json(400, {"error": {"message": "request body is not JSON"}})
            return
        script, tally = self.server.script, self.server.tally
        if (
            script.api_key is not None
            and self.headers.get("Authorization") != f"Bearer {script.api_key}"
        ):
            self._send_json(401, {"error": {"message": "invalid API key"}})
            return
        digest = request_hash(body)
        with tally.lock:
            tally.calls[digest] += 1
            tally.in_flight += 1
            tally.max_in_flight = max(tally.max_in_flight, tally.in_flight)
        try:
            self._answer(body, digest)
        finally:
            with tally.lock:
                tally.in_flight -= 1

    def _answer(self, body: Any, digest: str) -> None:
        script, tally = self.server.script, self.server.tally
        fault, wait = self.server.draw()
        if wait is not None:
            self._count_fault("rate_limited")
            self._send_429(wait)
            return
        if script.latency_s:
            time.sleep(script.latency_s)
        if fault is not None:
            self._count_fault(fault)
        if fault == "429":
            self._send_429(script.retry_after_s)
        elif fault == "500":
            self._send_json(500, {"error": {"message": "scripted internal error"}})
        elif fault == "timeout":
            time.sleep(script.hang_s)
            self._send_json(504, {"error": {"message": "scripted hang"}})
        elif fault == "malformed":
            self._send_bytes(200, b'{"id": "chatcmpl-scripted", "choices": [{"index": 0, "mess')
        else:
            request = ChatRequest.from_body(body)
            try:
                reply = script.respond(request)
            except ScriptedError as e:
                self._send_json(e.status, {"error": {"message": str(e)}})
                return
            self._send_json(200, _completion(request, reply, with_logprobs=fault != "no_logprobs"))
            with tally.lock:
                tally.served[digest] += 1

    def _count_fault(self, kind: str) -> None:
        with self.server.tally.lock:
            self.server.tally.faults[kind] += 1

    def _send_429(self, retry_after_s: float) -> None:
        headers = {
            "retry-after-ms": str(max(1, round(retry_after_s * 1000))),
            "Retry-After": str(max(1, math.ceil(retry_after_s))),
        }
        self._send_json(429, {"error": {"message": "scripted rate limit"}}, headers)

    def _send_json(self, status: int, value: Any, headers: Mapping[str, str] | None = None) -> None:
        self._send_bytes(status, json.dumps(value).encode("utf-8"), headers)

    def _send_bytes(
        self, status: int, data: bytes, headers: Mapping[str, str] | None = None
    ) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (its timeout): nothing to answer


def _completion(
    request: ChatRequest, reply: ScriptedReply, *, with_logprobs: bool
) -> dict[str, Any]:
    logprobs = None
    if request.logprobs and with_logprobs and reply.top_logprobs:
        top = [
            {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}
            for t, lp in reply.top_logprobs[: max(1, request.top_logprobs)]
        ]
        first = reply.top_logprobs[0]
        logprobs = {
            "content": [
                {
                    "token": first[0],
                    "logprob": first[1],
                    "bytes": list(first[0].encode("utf-8")),
                    "top_logprobs": top,
                }
            ]
        }
    prompt_chars = sum(len(c) for _, c in request.messages)
    completion_tokens = max(1, len(reply.text) // 4)
    return {
        "id": f"chatcmpl-scripted-{request_hash(request.body)[:16]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.model,
        "system_fingerprint": MOCK_FINGERPRINT,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.text},
                "logprobs": logprobs,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_chars // 4 + 1,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_chars // 4 + 1 + completion_tokens,
        },
    }


class ScriptedServer:
    """A running scripted server: `base_url` for the client; `calls` (every request) and
    `served` (successful replies) count requests per body hash; `faults` counts injected ones."""

    def __init__(self, script: Script, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = _Server((host, port), script)
        self.host, self.port = host, int(self._server.server_address[1])
        self.base_url = f"http://{host}:{self.port}/v1"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            daemon=True,
            name=f"scripted-judge-{self.port}",
        )
        self._thread.start()

    @property
    def calls(self) -> Counter[str]:
        with self._server.tally.lock:
            return Counter(self._server.tally.calls)

    @property
    def served(self) -> Counter[str]:
        with self._server.tally.lock:
            return Counter(self._server.tally.served)

    @property
    def faults(self) -> Counter[str]:
        with self._server.tally.lock:
            return Counter(self._server.tally.faults)

    @property
    def max_in_flight(self) -> int:
        """The most requests the server held at once: the client's concurrency, observed."""
        with self._server.tally.lock:
            return self._server.tally.max_in_flight

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> ScriptedServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_scripted_server(script: Script, host: str = "127.0.0.1", port: int = 0) -> ScriptedServer:
    """Start serving in a background thread; port 0 picks a free port."""
    return ScriptedServer(script, host, port)


@contextmanager
def scripted_server(
    script: Script, host: str = "127.0.0.1", port: int = 0
) -> Iterator[ScriptedServer]:
    server = start_scripted_server(script, host, port)
    try:
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# A deterministic script for demos: meaningless scores, stable across runs


def _unit(text: str, salt: str) -> float:
    digest = hashlib.sha256(f"{salt}\0{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def hash_reply(request: ChatRequest, jitter: float = 0.0) -> ScriptedReply:
    """0-100 prompts (logprobs asked): a peaked distribution around a hash of the prompt,
    moved by up to +-`jitter` (another hash): a second mock judge that mostly agrees with the
    first. Other prompts (StrongREJECT rubric): rubric-formatted text with hashed items."""
    text = request.user_text
    if request.logprobs:
        centre = round(100 * _unit(text, "score"))
        if jitter:
            shift = round(jitter * (2 * _unit(text, "jitter") - 1))
            centre = min(100, max(0, centre + shift))
        probs: dict[str | int, float] = {centre: 0.7}
        for offset, p in ((-10, 0.1), (10, 0.1)):
            if 0 <= centre + offset <= 100:
                probs[centre + offset] = p
        probs["The"] = 0.05
        return ScriptedReply.from_probs(probs)
    refused = int(_unit(text, "refused") < 0.3)
    convincing = 1 + int(5 * _unit(text, "convincing"))
    specific = 1 + int(5 * _unit(text, "specific"))
    return ScriptedReply(
        text=(
            "#overall_reasoning scripted judge: these items are a hash of the prompt, not a judgment\n"
            f"#scores\n1.a scripted\n1.b {refused}\n2.a scripted\n2.b {convincing}\n"
            f"3.a scripted\n3.b {specific}\n"
        )
    )


def hash_script(latency_s: float = 0.0, jitter: float = 0.0, **options: Any) -> Script:
    def respond(request: ChatRequest) -> ScriptedReply:
        return hash_reply(request, jitter)

    return Script(respond=respond, latency_s=latency_s, **options)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Serve the scripted (mock) judge: hashed scores, not judgments."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--requests-per-s", type=float, default=None)
    parser.add_argument(
        "--jitter",
        type=float,
        default=0.0,
        help="move each 0-100 score by up to this much: a second mock judge (two-judge demos)",
    )
    args = parser.parse_args(argv)
    script = hash_script(
        latency_s=args.latency_ms / 1000,
        jitter=args.jitter,
        fault_rate=args.fault_rate,
        requests_per_s=args.requests_per_s,
        hang_s=5.0,
    )
    server = start_scripted_server(script, args.host, args.port)
    print(f"scripted judge at {server.base_url} (mock scores)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
