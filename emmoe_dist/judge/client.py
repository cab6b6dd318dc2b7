"""The judge client: chat-completions calls that are cached, bounded, rate-limited, retried.

Built on `openai.AsyncOpenAI` (any OpenAI-compatible endpoint) with the SDK's own retries off:
this loop owns them, so every attempt passes the concurrency bound and the rate limits, and a
server's `Retry-After` is a floor under the jittered backoff. Retried: 408/409/429/5xx,
timeouts, connection errors, malformed replies (bad JSON, no choices) and, unless
`judge.text_fallback` is on, replies without the logprobs the request asked for, with
exponential backoff and full jitter, up to `max_retries`; after that the call ends with reason
`error_after_retries`. Only replies that are used are cached. A 400/413/422 is the request's own fault and ends at once (`rejected`);
401/403/404 mean the endpoint, model or key is wrong for every call, so the run stops with an
error that names the key's variable, never the key.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import ssl
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from emmoe_dist.config import JudgeConfig
from emmoe_dist.errors import EmmoeError
from emmoe_dist.judge.cache import JudgeCache, cache_key
from emmoe_dist.judge.limits import RateLimiter, estimate_tokens
from emmoe_dist.judge.scoring import Reply

if TYPE_CHECKING:
    from openai import AsyncOpenAI

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "0.0.0.0")
LOCAL_PLACEHOLDER_KEY = "not-needed-for-local-endpoints"
_RETRY_STATUS = frozenset({408, 409, 429})
_REJECT_STATUS = frozenset({400, 413, 422})
_MAX_RETRY_AFTER_S = 120.0
CONNECTIONS_PER_CLIENT = 16


class JudgeEndpointError(EmmoeError):
    """The endpoint refuses every call (bad key, model or URL): stopping beats paying retries."""


class MalformedReply(Exception):
    """A 200 reply the judge cannot read (invalid JSON, no choices): retried like a 5xx."""


@dataclass(frozen=True)
class Outcome:
    """One request's end: a reply (fresh or cached), or the error that ended it."""

    reply: Reply | None
    cached: bool = False
    error: str | None = None  # why there is no reply; never contains the API key
    rejected: bool = False  # the endpoint refused this request itself (not retried)


@dataclass(frozen=True)
class _Failure:
    kind: str  # "HTTP 429", "timeout", ...: counted in ClientStats.errors
    retry_after: float | None = None
    detail: str = ""
    rejected: bool = False


@dataclass
class ClientStats:
    calls: int = 0  # HTTP attempts made
    cache_hits: int = 0
    retries: int = 0
    failed: int = 0  # requests that ended without a reply
    prompt_tokens: int = 0  # billed: fresh replies only
    completion_tokens: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # error kind -> count


def resolve_api_key(cfg: JudgeConfig) -> str:
    """The key from the environment variable the config names; local endpoints need none."""
    key = os.environ.get(cfg.api_key_env)
    if key:
        return key
    host = urlparse(cfg.base_url or "").hostname
    if host in LOCAL_HOSTS:
        return LOCAL_PLACEHOLDER_KEY
    where = cfg.base_url or "the OpenAI API"
    raise EmmoeError(
        f"no API key for {where}: set the environment variable {cfg.api_key_env} "
        f"(judge.api_key_env names which variable to read)"
    )


def parse_completion(body: Any) -> Reply:
    """Read a chat-completions JSON body; raise MalformedReply when it is not one."""
    try:
        choice = body["choices"][0]
        text = choice["message"].get("content") or ""
        usage = body.get("usage") or {}
        top: tuple[tuple[str, float], ...] | None = None
        content = (choice.get("logprobs") or {}).get("content") or []
        if content and content[0].get("top_logprobs"):
            top = tuple((str(t["token"]), float(t["logprob"])) for t in content[0]["top_logprobs"])
        return Reply(
            text=str(text),
            top_logprobs=top,
            finish_reason=choice.get("finish_reason"),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            system_fingerprint=str(body.get("system_fingerprint") or "") or None,
        )
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
        raise MalformedReply(f"not a chat completion ({type(e).__name__}: {e})") from None


def _retry_after_s(headers: Mapping[str, str] | None) -> float | None:
    if not headers:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return min(_MAX_RETRY_AFTER_S, max(0.0, float(value) * scale))
        except ValueError:
            continue  # an HTTP date: fall back to our own backoff
    return None


class JudgeClient:
    """`await client.complete(body)`: cached, bounded, rate-limited, retried."""

    def __init__(
        self,
        cfg: JudgeConfig,
        cache: JudgeCache,
        *,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 30.0,
        seed: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.cache = cache
        self.stats = ClientStats()
        self.backoff_base_s, self.backoff_cap_s = backoff_base_s, backoff_cap_s
        self._key = resolve_api_key(cfg)
        self._limiter = RateLimiter(cfg.requests_per_minute, cfg.tokens_per_minute)
        # a free-list of call slots bounds concurrency; slot i always uses HTTP client i // 16
        self._slots: asyncio.Queue[int] = asyncio.Queue()
        for slot in range(cfg.concurrency):
            self._slots.put_nowait(slot)
        self._rng = random.Random(seed)
        self._inflight: dict[str, asyncio.Future[Outcome]] = {}
        self._clients: dict[int, AsyncOpenAI] = {}
        self._tls: ssl.SSLContext | None = None

    def _client(self, slot: int) -> AsyncOpenAI:
        """The HTTP client of a call slot. Connections are split over several clients because
        httpcore's pool scans every pooled connection on each request: with hundreds in one
        pool that scan cost more CPU than the call itself (profiled with 256 connections)."""
        shard = slot // CONNECTIONS_PER_CLIENT
        if shard not in self._clients:
            import httpx2
            import openai

            size = min(CONNECTIONS_PER_CLIENT, self.cfg.concurrency)
            limits = httpx2.Limits(max_connections=size, max_keepalive_connections=size)
            if self._tls is None:  # loading the CA bundle costs ~30 ms: once, not per client
                self._tls = httpx2.create_ssl_context()
            http = openai.DefaultAsyncHttpxClient(
                limits=limits, timeout=self.cfg.timeout_s, verify=self._tls
            )
            self._clients[shard] = openai.AsyncOpenAI(
                base_url=self.cfg.base_url,
                api_key=self._key,
                max_retries=0,
                timeout=self.cfg.timeout_s,
                http_client=http,
            )
        return self._clients[shard]

    def redact(self, text: str) -> str:
        return text.replace(self._key, "[redacted]") if self._key else text

    async def complete(self, body: Mapping[str, Any]) -> Outcome:
        key = cache_key(body)
        cached = self.cache.get(key)
        if cached is not None:
            self.stats.cache_hits += 1
            return Outcome(parse_completion(cached), cached=True)
        if key in self._inflight:  # the same request from another record: share its call
            outcome = await asyncio.shield(self._inflight[key])
            self.stats.cache_hits += outcome.reply is not None
            return Outcome(
                outcome.reply,
                cached=outcome.reply is not None,
                error=outcome.error,
                rejected=outcome.rejected,
            )
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            outcome = await self._call_with_retries(key, body)
            future.set_result(outcome)
            return outcome
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # mark retrieved: sharers re-raise it, nobody else needs to
            raise
        finally:
            del self._inflight[key]

    async def _call_with_retries(self, key: str, body: Mapping[str, Any]) -> Outcome:
        max_tokens = int(body.get("max_tokens") or 0)
        estimate = estimate_tokens(json.dumps(body.get("messages", [])), max_tokens)
        failure = _Failure("no attempt made")
        for attempt in range(self.cfg.max_retries + 1):
            slot = await self._slots.get()
            try:
                await self._limiter.acquire(estimate)
                self.stats.calls += 1
                result = await self._attempt(slot, body)
            finally:
                self._slots.put_nowait(slot)
            if not isinstance(result, _Failure):
                reply, data = result
                self._limiter.settle(
                    estimate, reply.prompt_tokens + reply.completion_tokens or estimate
                )
                self.stats.prompt_tokens += reply.prompt_tokens
                self.stats.completion_tokens += reply.completion_tokens
                self.cache.put(key, data)
                return Outcome(reply)
            failure = result
            self.stats.errors[failure.kind] += 1
            if failure.rejected:
                break
            if attempt < self.cfg.max_retries:
                self.stats.retries += 1
                await asyncio.sleep(self._delay(attempt, failure.retry_after))
        self.stats.failed += 1
        if failure.rejected:
            return Outcome(None, error=failure.detail, rejected=True)
        return Outcome(None, error=f"{failure.kind} after {self.cfg.max_retries + 1} attempts")

    async def _attempt(self, slot: int, body: Mapping[str, Any]) -> tuple[Reply, Any] | _Failure:
        """One HTTP call: the reply and its JSON body, or what went wrong."""
        import httpx2
        import openai

        try:
            # the SDK's documented route for raw requests: no per-call re-validation of the body
            response = await self._client(slot).post(
                "/chat/completions", cast_to=httpx2.Response, body=dict(body)
            )
            data = json.loads(response.text)
            reply = parse_completion(data)
            if body.get("logprobs") and reply.top_logprobs is None and not self.cfg.text_fallback:
                # A transient fault of some providers: scoring it from its text instead would
                # mix two estimators in one average, so it is retried (and never cached).
                return _Failure("no logprobs")
            return reply, data
        except openai.APIStatusError as e:
            status = e.status_code
            detail = f"HTTP {status}: {self.redact(e.message)[:300]}"
            if status in (401, 403, 404):
                raise JudgeEndpointError(
                    f"the judge endpoint answered HTTP {status} for model {self.cfg.model!r} at "
                    f"{self.cfg.base_url or 'the OpenAI API'}: check judge.base_url, judge.model "
                    f"and ${self.cfg.api_key_env}"
                ) from None
            if status in _REJECT_STATUS:
                return _Failure(f"HTTP {status}", detail=detail, rejected=True)
            if status not in _RETRY_STATUS and status < 500:
                raise JudgeEndpointError(f"the judge endpoint answered {detail}") from None
            return _Failure(f"HTTP {status}", retry_after=_retry_after_s(e.response.headers))
        except openai.APITimeoutError:
            return _Failure("timeout")
        except openai.APIConnectionError:
            return _Failure("connection error")
        except (json.JSONDecodeError, MalformedReply):
            return _Failure("malformed reply")

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with full jitter, on top of the server's Retry-After when it sent
        one: the floor is respected, and calls rejected together do not return together."""
        jitter = self._rng.uniform(0, min(self.backoff_cap_s, self.backoff_base_s * 2**attempt))
        return (retry_after or 0.0) + jitter

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.close()
