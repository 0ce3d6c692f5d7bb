"""``edgerun serve``: an OpenAI-compatible HTTP server over one :class:`~edgerun.session.Session`.

One request is one turn. The API is stateless (every chat request carries the whole conversation), so
the server makes the request's messages the session's history and sends the last user message through
:meth:`Session.chat`: the planner makes that message's plan (task experts, KV layout, settings), the
chat template renders markup apart from message contents (text a client sends is tokenized as text,
never as control tokens), and llama.cpp reuses the KV cache for the prompt prefix the request shares
with the previous one. ``/v1/completions`` runs a raw prompt (plain text, BOS added when the model
wants it) as one planned turn without a chat template.

Requests run one at a time (one model, a few cores) in a worker thread, in arrival order; at most
``max_queue`` wait, and the next one gets 503 with ``Retry-After``. A client that disconnects stops its
generation within one token and frees the slot. Responses carry the plan and the generation stats in an
``edgerun`` extension field; ``/metrics`` exposes them in Prometheus text format.

Why FastAPI + uvicorn rather than llama-cpp-python's server: docs/serve.md.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hmac
import ipaddress
import json
import math
import secrets
import signal
import socket
import threading
import time
import uuid
from typing import Any, Callable, Iterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgerun.backends.base import SamplingParams, reply_budget
from edgerun.errors import EdgerunError, UsageError
from edgerun.session import Session, Turn, check_text

API_KEY_ENV = "EDGERUN_API_KEY"
"""Environment variable read for the API key when ``--api-key`` is not given."""

SEED_MAX = 2**32 - 2
DEFAULT_MAX_BODY = 4 * 2**20
"""Largest request body accepted, bytes (4 MiB: far more text than any context here holds)."""


# --- errors -------------------------------------------------------------------------------------------

class APIError(Exception):
    """An error answered as OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}``.

    Args:
        status: HTTP status code. message: one line naming the problem (and the fix).
        type: OpenAI error type (``invalid_request_error``, ``authentication_error``, ...).
        param: the request field at fault, or None. code: a short machine-readable code, or None.
        headers: extra response headers (e.g. ``Retry-After``).
    """

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        """The error as a JSON response with its status and headers."""
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=self.headers)


# --- request bodies -------------------------------------------------------------------------------------

class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[_Part] | None = None


class _Common(BaseModel):
    # Fields of the OpenAI API this server does not use (user, presence_penalty, ...) are accepted and
    # ignored, as other local servers do; those that would change the answer's shape are refused below.
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None
    logprobs: Any = None
    ignore_eos: bool = False  # extension (as llama.cpp's server): decode exactly max_tokens tokens


class ChatRequest(_Common):
    """Body of ``POST /v1/chat/completions`` (OpenAI Chat Completions; unknown fields are ignored)."""

    messages: list[_Message]
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list | None = None


class CompletionRequest(_Common):
    """Body of ``POST /v1/completions`` (OpenAI legacy Completions; unknown fields are ignored)."""

    prompt: str | list[str]
    echo: bool = False
    best_of: int | None = None
    max_tokens: int | None = Field(16, ge=1)  # the Completions API's own default


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err.get("loc", ()))
    msg = err.get("msg", "invalid value")
    if err.get("type") == "missing":
        return f"'{loc}' is required", loc
    return f"invalid '{loc}': {msg}", loc or None


# --- stop strings ------------------------------------------------------------------------------------------

class StopMatcher:
    """Cuts streamed text before the first stop string, holding back a tail that may begin one.

    Args:
        stops: stop strings (empty strings are ignored).
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.buf = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """Add a piece; returns (text safe to send now, True when a stop string was reached)."""
        self.buf += piece
        if not self.stops:
            out, self.buf = self.buf, ""
            return out, False
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[:min(hits)], ""
            return out, True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), keep, -1):
                if self.buf.endswith(s[:k]):
                    keep = k
                    break
        out, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return out, False

    def flush(self) -> str:
        """The held-back tail at the end of the generation."""
        out, self.buf = self.buf, ""
        return out


# --- one generation --------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Job:
    """A request's generation, run in the worker thread; events go to the event loop's queue."""

    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    started: float = dataclasses.field(default_factory=time.perf_counter)
    turn: Turn | None = None
    finish: str = ""
    text: list[str] = dataclasses.field(default_factory=list)
    cancelled: bool = False        # the generation was stopped (client gone, shutdown)
    delivered: bool = False        # the response saw the job's last event

    def put(self, kind: str, value: Any = None) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_host(host: str, allow_remote: bool) -> str | None:
    """Refuse a non-loopback address unless ``allow_remote``; returns a warning to print when it is allowed.

    Raises:
        UsageError: ``host`` is not a loopback address and ``allow_remote`` is False.
    """
    if _is_loopback(host):
        return None
    if not allow_remote:
        raise UsageError(f"--host {host} is not a loopback address: other machines could reach the model; "
                         "pass --allow-remote as well (and set --api-key) if you mean it")
    return (f"warning: serving on {host}: any machine that can reach this address can use the model "
            "(set --api-key or EDGERUN_API_KEY so that requests need a key)")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free port; ``sock.getsockname()[1]`` tells which).

    Raises:
        UsageError: the address is in use or cannot be bound (one line naming it).
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UsageError(f"cannot resolve --host {host}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        if e.errno in (98, 48):  # EADDRINUSE (Linux, macOS)
            raise UsageError(f"port {port} on {host} is in use; pick another with --port") from None
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


class Server:
    """The OpenAI-compatible app over one session (``Server(...).app`` is the ASGI application).

    Args:
        session: the loaded chat session; the server owns it from now on (one request at a time).
        model_id: the model name clients pass as ``model`` (others get 404).
        api_key: when set, every request needs ``Authorization: Bearer <key>`` (401 otherwise).
        max_queue: requests allowed to wait while one runs; the next gets 503 with ``Retry-After``.
        max_body: largest request body, bytes (400 ``body_too_large`` above it, naming the limit).
        default_seed: seed of a request that gives none; None draws one per request (shown in the
            ``edgerun`` field), so unseeded requests differ as with OpenAI.
    """

    def __init__(self, session: Session, model_id: str, api_key: str | None = None, max_queue: int = 16,
                 max_body: int = DEFAULT_MAX_BODY, default_seed: int | None = None):
        if max_queue < 0:
            raise UsageError("--max-queue must be >= 0")
        self.session, self.model_id = session, model_id
        self.api_key = api_key or None
        self.max_queue, self.max_body = int(max_queue), int(max_body)
        self.default_seed = default_seed
        self.defaults = dataclasses.replace(session.sampling)
        self.created = int(time.time())
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgerun-serve")
        self._slot: asyncio.Lock | None = None
        self._waiting = 0
        self._active: _Job | None = None
        self._mean_s = 1.0           # moving mean of a request's duration, s (for Retry-After)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.shutting_down = False
        self._metrics()
        self.app = _Gate(self._build_app(), self)

    # --- metrics --------------------------------------------------------------------------------------

    def _metrics(self) -> None:
        r = self.registry = CollectorRegistry()
        self.m_requests = Counter("edgerun_requests", "HTTP requests by endpoint and status code",
                                  ["endpoint", "code"], registry=r)
        self.m_cancelled = Counter("edgerun_cancelled_generations", "generations stopped because the client left",
                                   registry=r)
        self.m_ttft = Histogram("edgerun_ttft_seconds", "request received to first token sent (queue wait included)",
                                buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        self.m_queue = Histogram("edgerun_queue_wait_seconds", "time a request waited for the model",
                                 buckets=(0.001, 0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.m_decode = Histogram("edgerun_decode_tokens_per_second", "decode speed of each reply (engine counters)",
                                  buckets=(1, 2, 5, 10, 20, 30, 40, 50, 60, 80, 100, 150, 200, 400), registry=r)
        self.m_prompt = Counter("edgerun_prompt_tokens", "prompt tokens of the replies", registry=r)
        self.m_cached = Counter("edgerun_prompt_tokens_cached", "prompt tokens reused from the KV cache", registry=r)
        self.m_completion = Counter("edgerun_completion_tokens", "tokens generated", registry=r)
        self.m_waiting = Gauge("edgerun_queue_waiting", "requests waiting for the model", registry=r)
        self.m_busy = Gauge("edgerun_busy", "1 while a request is generating", registry=r)
        self.m_plan = Info("edgerun_last_plan", "the plan of the last request", registry=r)

    def _record_plan(self, turn: Turn) -> None:
        p = turn.plan
        info = {"engine": p.engine, "model": p.model_path.name, "history": turn.history,
                "experts": f"{p.experts.task} {p.experts.a}/{p.experts.b}" if p.experts else "none",
                "kv_layout": p.kv.layout.name if p.kv else "as loaded",
                "reasons": " | ".join(p.reasons)}
        info.update({f"setting_{k}": str(v) for k, v in p.settings.items()})
        self.m_plan.info(info)

    # --- the slot (one request at a time, bounded queue) -----------------------------------------------

    async def _acquire(self, request: Request) -> bool:
        """Wait for the model; False when the client left first.

        Raises:
            APIError: 503 with Retry-After when ``max_queue`` requests already wait (or shutting down).
        """
        if self._slot is None:
            self._slot = asyncio.Lock()
        if self.shutting_down:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        if self._slot.locked() and self._waiting >= self.max_queue:
            retry = max(1, min(600, math.ceil(self._mean_s * (self._waiting + 1))))
            raise APIError(503, f"the model is busy and {self._waiting} requests wait (--max-queue "
                           f"{self.max_queue}); retry in about {retry} s", type="server_error",
                           code="queue_full", headers={"Retry-After": str(retry)})
        self._waiting += 1
        self.m_waiting.set(self._waiting)
        acquire = asyncio.ensure_future(self._slot.acquire())
        left = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({acquire, left}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._waiting -= 1
            self.m_waiting.set(self._waiting)
            left.cancel()
        if acquire.done() and not acquire.cancelled():
            if left.done() and not left.cancelled() and left.result():
                self._slot.release()
                return False
            return True
        if not acquire.cancel():  # acquired at the same moment
            self._slot.release()
        return False

    def _release(self, job: _Job) -> None:
        self._mean_s = 0.8 * self._mean_s + 0.2 * (time.perf_counter() - job.started)
        self._active = None
        self.m_busy.set(0)
        self._slot.release()

    def cancel_all(self) -> None:
        """Stop the running generation (within a token) and refuse new requests: called on SIGINT/SIGTERM."""
        self.shutting_down = True
        job = self._active
        if job is not None:
            job.cancel.set()

    # --- the worker thread ----------------------------------------------------------------------------

    def _run(self, job: _Job, start: Callable[[], Iterator[str]], stop: list[str]) -> None:
        """Run one generation in the worker thread: ``start()`` plans the turn and returns its text stream."""
        s = self.session
        pieces = None
        try:
            pieces = start()
            job.turn = s.last_turn
            job.put("start", job.turn)
            matcher, hit = StopMatcher(stop), False
            for piece in pieces:
                if job.cancel.is_set():
                    job.cancelled = True
                    break
                text, hit = matcher.feed(piece)
                if text:
                    job.put("text", text)
                if hit:
                    break
            else:
                tail = matcher.flush()
                if tail:
                    job.put("text", tail)
            pieces.close()  # stops the engine when the loop left early (stop string, client gone)
            stats = job.turn.stats
            if hit:
                stats.finish_reason = "stop"
            elif job.cancelled:
                stats.finish_reason = "cancelled"
            job.finish = "length" if stats.finish_reason == "length" else "stop"
            job.put("end", None)
        except EdgerunError as e:
            job.put("error", e)
        except Exception as e:  # an engine bug: answered as a 500 with its message, the server keeps serving
            job.put("error", e)
        finally:
            if pieces is not None:
                pieces.close()
            s.sampling = dataclasses.replace(self.defaults)
            del s.turns[:-1]             # a long-running server keeps only the last turn's record
            self.loop.call_soon_threadsafe(self._release, job)

    def _chat_start(self, messages: list[dict], sampling: SamplingParams) -> Callable[[], Iterator[str]]:
        def start():
            s = self.session
            s.sampling = sampling
            tokens = s.backend.encode_chat(s.template.render_parts(messages, add_generation_prompt=True))
            self._check_fits(len(tokens), sampling)
            s.messages = [dict(m) for m in messages[:-1]]
            return s.chat(messages[-1]["content"], stream=True)
        return start

    def _completion_start(self, prompt: str, sampling: SamplingParams) -> Callable[[], Iterator[str]]:
        def start():
            s = self.session
            s.sampling = sampling
            tokens = s.backend.encode_chat([(prompt, False)])  # plain text (+ BOS when the model wants it)
            self._check_fits(len(tokens), sampling)
            s.messages = []
            previous = s.turns[-1].plan if s.turns else None
            plan = s.planner.plan(prompt, len(tokens), reply_budget(s.backend.n_ctx, len(tokens), sampling.max_tokens),
                                  loaded=(s.backend.path, s.backend.memory().model_bytes), previous=previous)
            turn = s._apply(plan)  # the session's one place that runs a plan (model, KV layout)
            s.turns.append(turn)
            return _recorded(s, turn, s.backend.stream(tokens, sampling))
        return start

    def _check_fits(self, n_prompt: int, sampling: SamplingParams) -> None:
        """Refuse a prompt the session would have to trim (the API is stateless: never drop a client's turns).

        Raises:
            UsageError: the prompt leaves less than the reply's room in the context.
        """
        n_ctx = self.session.backend.n_ctx
        room = n_ctx // 4 if sampling.max_tokens is None else min(sampling.max_tokens, n_ctx // 2)
        if n_prompt > n_ctx - room:
            raise _ContextError(f"the prompt is {n_prompt} tokens; the context is {n_ctx} tokens and keeps {room} "
                                f"for the reply, so at most {n_ctx - room} prompt tokens fit: shorten the "
                                "messages or lower max_tokens (or restart the server with a larger --ctx-size)")

    # --- request handling -----------------------------------------------------------------------------

    def _sampling(self, body: _Common, max_tokens: int | None) -> SamplingParams:
        n_ctx = self.session.backend.n_ctx
        if max_tokens is not None and max_tokens > n_ctx:
            raise APIError(400, f"max_tokens {max_tokens} is more than the context of {n_ctx} tokens",
                           param="max_tokens")
        if body.n != 1:
            raise APIError(400, f"n={body.n}: this server returns one choice per request (n=1)", param="n")
        if body.logprobs not in (None, False, 0):
            raise APIError(400, "logprobs are not supported", param="logprobs")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4:
            raise APIError(400, "at most 4 stop strings", param="stop")
        if max_tokens is None:
            max_tokens = self.defaults.max_tokens
        elif self.defaults.max_tokens is not None:
            max_tokens = min(max_tokens, self.defaults.max_tokens)
        if body.ignore_eos and max_tokens is None:
            raise APIError(400, "ignore_eos needs max_tokens", param="ignore_eos")
        seed = body.seed if body.seed is not None else self.default_seed
        if seed is None:
            seed = secrets.randbelow(2**31)
        return dataclasses.replace(
            self.defaults, max_tokens=max_tokens, seed=seed, ignore_eos=bool(body.ignore_eos),
            temperature=self.defaults.temperature if body.temperature is None else body.temperature,
            top_p=self.defaults.top_p if body.top_p is None else body.top_p)

    def _check_model(self, name: str) -> None:
        if name != self.model_id:
            raise APIError(404, f"model '{name}' is not served here; this server serves '{self.model_id}' "
                           "(GET /v1/models)", param="model", code="model_not_found")

    def _too_large(self, size: int | None = None) -> APIError:
        """The 400 ``body_too_large`` error naming the limit; ``size``: the body's declared length, bytes."""
        mib = self.max_body // 2**20
        limit = f"{self.max_body} bytes" + (f" ({mib} MiB)" if mib and self.max_body == mib * 2**20 else "")
        seen = f"is {size} bytes, over" if size is not None else "exceeds"
        return APIError(400, f"the request body {seen} the limit of {limit}", code="body_too_large")

    async def _body(self, request: Request, model: type[BaseModel]) -> BaseModel:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.max_body:
            raise self._too_large(int(size))
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > self.max_body:
                raise self._too_large()
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            message, param = _validation_message(e)
            raise APIError(400, message, param=param) from None

    def _messages(self, body: ChatRequest) -> list[dict]:
        if not body.messages:
            raise APIError(400, "'messages' is empty: send at least one user message", param="messages")
        if body.tools:
            raise APIError(400, "tools are not supported", param="tools")
        out = []
        for i, m in enumerate(body.messages):
            role = {"developer": "system"}.get(m.role, m.role)
            if role not in ("system", "user", "assistant"):
                raise APIError(400, f"messages[{i}].role '{m.role}' is not supported; use system, user or assistant",
                               param=f"messages[{i}].role")
            if isinstance(m.content, list):
                bad = [p.type for p in m.content if p.type != "text" or p.text is None]
                if bad:
                    raise APIError(400, f"messages[{i}] has a '{bad[0]}' part; only text parts are supported",
                                   param=f"messages[{i}].content")
                content = "".join(p.text for p in m.content)
            elif m.content is None:
                raise APIError(400, f"messages[{i}].content is missing", param=f"messages[{i}].content")
            else:
                content = m.content
            try:
                check_text(content, f"messages[{i}].content")
            except UsageError as e:
                raise APIError(400, str(e), param=f"messages[{i}].content") from None
            out.append({"role": role, "content": content})
        if out[-1]["role"] != "user":
            raise APIError(400, f"the last message must be from the user, not the {out[-1]['role']}",
                           param="messages")
        if not out[-1]["content"].strip():
            raise APIError(400, "the last user message is empty", param="messages")
        return out

    async def _generate(self, request: Request, start, sampling: SamplingParams, stop: list[str], stream: bool,
                        render) -> Response:
        """Queue, run and answer one request; ``render(kind, job, text, seed, queue_s)`` shapes its JSON."""
        t0 = time.perf_counter()
        if not await self._acquire(request):
            self.m_cancelled.inc()
            return Response(status_code=499)
        queue_s = time.perf_counter() - t0
        self.m_queue.observe(queue_s)
        self.loop = asyncio.get_running_loop()
        job = _Job(self.loop)
        self._active = job
        self.m_busy.set(1)
        try:
            self._executor.submit(self._run, job, start, stop)
        except RuntimeError:  # executor shut down
            self._release(job)
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        kind, value = await job.events.get()
        if kind == "error":
            raise _api_error(value)          # the job's last event: the worker frees the slot next
        self._record_plan(job.turn)
        seed = sampling.seed
        if stream:
            return _SSE(self._sse(job, t0, render, seed, queue_s), job, self)
        left = asyncio.ensure_future(_disconnected(request))
        first = True
        try:
            while True:
                get = asyncio.ensure_future(job.events.get())
                done, _ = await asyncio.wait({get, left}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    job.cancel.set()
                    self.m_cancelled.inc()
                    await _drain(job)
                    return Response(status_code=499)
                kind, value = get.result()
                if kind == "text":
                    if first:
                        self.m_ttft.observe(time.perf_counter() - t0)
                        first = False
                    job.text.append(value)
                elif kind == "error":
                    raise _api_error(value)
                elif kind == "end":
                    break
        finally:
            left.cancel()
            job.delivered = True
        if job.cancelled:  # server shutting down
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        self._observe(job)
        return JSONResponse(render("full", job, "".join(job.text), seed, queue_s))

    def _observe(self, job: _Job) -> None:
        st = job.turn.stats
        if st.decode_tokens_per_s:
            self.m_decode.observe(st.decode_tokens_per_s)
        self.m_prompt.inc(st.prompt_tokens)
        self.m_cached.inc(max(0, st.prompt_tokens - st.prefill_tokens))
        self.m_completion.inc(st.generated_tokens)

    async def _sse(self, job: _Job, t0: float, render, seed: int, queue_s: float):
        first = True
        yield _event(render("head", job, "", seed, queue_s))
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                if first:
                    self.m_ttft.observe(time.perf_counter() - t0)
                    first = False
                job.text.append(value)
                yield _event(render("delta", job, value, seed, queue_s))
            elif kind == "error":
                job.delivered = True
                err = _api_error(value)
                yield _event({"error": {"message": err.message, "type": err.type, "param": None, "code": err.code}})
                break
            elif kind == "end":
                job.delivered = True
                if job.cancelled:
                    yield _event({"error": {"message": "the server is shutting down", "type": "server_error",
                                            "param": None, "code": "shutting_down"}})
                    break
                self._observe(job)
                for chunk in render("tail", job, "", seed, queue_s):
                    yield _event(chunk)
                break
        yield "data: [DONE]\n\n"

    # --- responses --------------------------------------------------------------------------------------

    def _ext(self, job: _Job, seed: int, queue_s: float, stats: bool = True) -> dict:
        t = job.turn
        d = {"plan": t.plan.as_dict(), "history": t.history, "load_ms": t.load_ms, "seed": seed,
             "queue_ms": round(queue_s * 1e3, 3)}
        if stats:
            d["stats"] = t.stats.as_dict()
            d["accounting"] = t.accounting
        return d

    def _usage(self, job: _Job) -> dict:
        st = job.turn.stats
        return {"prompt_tokens": st.prompt_tokens, "completion_tokens": st.generated_tokens,
                "total_tokens": st.prompt_tokens + st.generated_tokens,
                "prompt_tokens_details": {"cached_tokens": max(0, st.prompt_tokens - st.prefill_tokens)}}

    def _chat_render(self, rid: str, include_usage: bool):
        created = int(time.time())

        def render(kind, job, text, seed, queue_s):
            base = {"id": rid, "created": created, "model": self.model_id, "system_fingerprint": None}
            if kind == "full":
                return {**base, "object": "chat.completion",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "logprobs": None, "finish_reason": job.finish}],
                        "usage": self._usage(job), "edgerun": self._ext(job, seed, queue_s)}
            chunk = {**base, "object": "chat.completion.chunk"}
            if kind == "head":
                return {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                              "logprobs": None, "finish_reason": None}],
                        "edgerun": self._ext(job, seed, queue_s, stats=False)}
            if kind == "delta":
                return {**chunk, "choices": [{"index": 0, "delta": {"content": text}, "logprobs": None,
                                              "finish_reason": None}]}
            out = [{**chunk, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": job.finish}],
                    "edgerun": self._ext(job, seed, queue_s)}]
            if include_usage:
                out.append({**chunk, "choices": [], "usage": self._usage(job)})
            return out
        return render

    def _completion_render(self, rid: str, include_usage: bool):
        created = int(time.time())

        def render(kind, job, text, seed, queue_s):
            base = {"id": rid, "object": "text_completion", "created": created, "model": self.model_id,
                    "system_fingerprint": None}
            if kind == "full":
                return {**base, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": job.finish}],
                        "usage": self._usage(job), "edgerun": self._ext(job, seed, queue_s)}
            if kind == "head":
                return {**base, "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": None}],
                        "edgerun": self._ext(job, seed, queue_s, stats=False)}
            if kind == "delta":
                return {**base, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": None}]}
            out = [{**base, "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": job.finish}],
                    "edgerun": self._ext(job, seed, queue_s)}]
            if include_usage:
                out.append({**base, "choices": [], "usage": self._usage(job)})
            return out
        return render

    # --- the app --------------------------------------------------------------------------------------

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="edgerun", docs_url=None, redoc_url=None, openapi_url=None)
        server = self

        @app.exception_handler(APIError)
        async def api_error(request: Request, e: APIError):
            return e.response()

        @app.exception_handler(StarletteHTTPException)
        async def http_error(request: Request, e: StarletteHTTPException):
            msg = {404: f"no route {request.method} {request.url.path}", 405: f"{request.method} is not allowed on "
                   f"{request.url.path}"}.get(e.status_code, str(e.detail))
            return APIError(e.status_code, msg, code="not_found" if e.status_code == 404 else None).response()

        @app.exception_handler(Exception)
        async def internal(request: Request, e: Exception):
            return APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").response()

        @app.get("/health")
        async def health():
            return {"status": "shutting down" if server.shutting_down else "ok", "model": server.model_id,
                    "busy": server._active is not None, "queued": server._waiting}

        @app.get("/metrics")
        async def metrics():
            return Response(generate_latest(server.registry), media_type=CONTENT_TYPE_LATEST)

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [server._model_card()]}

        @app.get("/v1/models/{name:path}")
        async def model(name: str):
            server._check_model(name)
            return server._model_card()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await server._body(request, ChatRequest)
            server._check_model(body.model)
            messages = server._messages(body)
            sampling = server._sampling(body, body.max_completion_tokens or body.max_tokens)
            stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
            usage = bool((body.stream_options or {}).get("include_usage"))
            return await server._generate(request, server._chat_start(messages, sampling), sampling, stops, body.stream,
                                          server._chat_render(f"chatcmpl-{uuid.uuid4().hex[:24]}", usage))

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await server._body(request, CompletionRequest)
            server._check_model(body.model)
            prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
            if len(prompts) != 1:
                raise APIError(400, "send one prompt per request", param="prompt")
            if not prompts[0]:
                raise APIError(400, "the prompt is empty", param="prompt")
            try:
                check_text(prompts[0], "prompt")
            except UsageError as e:
                raise APIError(400, str(e), param="prompt") from None
            if body.echo or (body.best_of or 1) != 1:
                raise APIError(400, "echo and best_of are not supported", param="echo" if body.echo else "best_of")
            sampling = server._sampling(body, body.max_tokens)
            stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
            usage = bool((body.stream_options or {}).get("include_usage"))
            return await server._generate(request, server._completion_start(prompts[0], sampling), sampling, stops,
                                          body.stream, server._completion_render(f"cmpl-{uuid.uuid4().hex[:24]}",
                                                                                 usage))

        return app

    def _model_card(self) -> dict:
        b = self.session.backend
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "edgerun",
                "edgerun": {"engine": b.name, "path": str(b.path), "n_ctx": b.n_ctx, "threads": b.threads,
                            "template": self.session.template.name}}

    def close(self) -> None:
        """Stop the running generation and the worker thread (the session stays open: the caller closes it)."""
        self.cancel_all()
        self._executor.shutdown(wait=True)


_ENDPOINTS = frozenset({"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"})


class _ContextError(UsageError):
    """The prompt does not fit the context (answered as 400 ``context_length_exceeded``)."""


def _api_error(e: Exception) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, _ContextError):
        return APIError(400, str(e), param="messages", code="context_length_exceeded")
    if isinstance(e, EdgerunError):
        # a refused message (empty, template refused the conversation, plan over the device budget)
        return APIError(400, str(e))
    return APIError(500, f"the engine failed: {type(e).__name__}: {e}", type="server_error")


def _authorized(scope, key: str) -> bool:
    header = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() == b"authorization"), "")
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


async def _disconnected(request: Request) -> bool:
    """Returns True when the client disconnects (waits until then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return True


async def _drain(job: _Job) -> None:
    """Wait for a job's last event (the worker frees the slot right after)."""
    while True:
        kind, _ = await job.events.get()
        if kind in ("end", "error"):
            return


def _recorded(session: Session, turn: Turn, pieces: Iterator[str]) -> Iterator[str]:
    """A completion's text stream whose end (exhausted, closed or failed) fills the turn's record."""
    try:
        yield from pieces
    finally:
        pieces.close()
        turn.stats = session.backend.last_stats
        turn.accounting = session.backend.accounting()


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class _SSE(StreamingResponse):
    """A server-sent-event stream whose generation stops when the response ends early (client gone)."""

    def __init__(self, content, job: _Job, server: Server):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job, self.server = job, server

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.job.delivered and not self.job.cancel.is_set():
                self.job.cancel.set()
                self.server.m_cancelled.inc()


class _Gate:
    """ASGI wrapper: the API key on every request (401), and the request counter by endpoint and status."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in _ENDPOINTS else "other"
        status = {"code": 499}

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            key = self.server.api_key
            if key is not None and not _authorized(scope, key):
                await APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                               type="authentication_error", code="invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"}).response()(scope, receive, counted_send)
            else:
                await self.app(scope, receive, counted_send)
        finally:
            self.server.m_requests.labels(endpoint, str(status["code"])).inc()


class _UvicornServer(uvicorn.Server):
    """uvicorn's server, stopping the running generation as soon as SIGINT/SIGTERM arrives."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]):
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        self._on_exit()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        """SIGINT/SIGTERM stop the server gracefully and ``run`` returns (uvicorn would raise the signal
        again afterwards, killing the process before the model is closed)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def make_server(server: Server, host: str = "127.0.0.1", port: int = 8080, log_level: str = "warning") -> uvicorn.Server:
    """A uvicorn server for ``server.app``: run it with ``.run(sockets=[sock])`` (a :func:`bind` socket), in the
    main thread for signal handling or in another thread (tests). SIGINT/SIGTERM stop the running generation
    at once, then wait up to 10 s for open responses to end."""
    config = uvicorn.Config(server.app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=10, lifespan="off")
    return _UvicornServer(config, server.cancel_all)


def serve(session: Session, model_id: str, host: str = "127.0.0.1", port: int = 8080, *,
          sock: socket.socket | None = None, api_key: str | None = None, max_queue: int = 16,
          max_body: int = DEFAULT_MAX_BODY, default_seed: int | None = None, log_level: str = "warning",
          ready: Callable[[str], None] | None = None) -> None:
    """Serve ``session`` over HTTP until SIGINT or SIGTERM (blocks).

    Args:
        session: the loaded chat session (see :class:`Server`). model_id: the name clients use.
        host, port: where to listen (used when ``sock`` is None; bind loopback unless you mean otherwise:
            :func:`check_host`). sock: an already bound socket (:func:`bind`).
        api_key, max_queue, max_body, default_seed: see :class:`Server`.
        ready: called with the base URL once the server listens.

    Raises:
        UsageError: the address is in use or cannot be bound.
    """
    sock = sock or bind(host, port)
    app = Server(session, model_id, api_key=api_key, max_queue=max_queue, max_body=max_body,
                 default_seed=default_seed)
    h, p = sock.getsockname()[:2]
    uv = make_server(app, host=h, port=p, log_level=log_level)
    if ready is not None:
        ready(f"http://{'[' + h + ']' if ':' in h else h}:{p}")
    try:
        uv.run(sockets=[sock])
    finally:
        app.close()
        sock.close()
