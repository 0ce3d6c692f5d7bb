"""A chat session: message history, the model's chat template, the context-window policy, streaming and stats.

Context-window policy: before each reply the whole conversation is formatted with the chat
template and tokenized. If it plus a reply budget (``max_tokens``, at most half the context;
a quarter of the context when unbounded) does not fit, the oldest turns are dropped, the system
prompt always kept, and the user is told once per session. A single message longer than the
context is cut to its last tokens. Generation stops at the end of the context instead of failing.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from edgerun.backends.base import Backend, GenerationStats, SamplingParams, reply_budget
from edgerun.errors import BackendError, UsageError
from edgerun.planner import Plan, Planner
from edgerun.templates import ChatTemplate


@dataclass
class Turn:
    """One record per turn: the plan applied and what the generation measured.

    Attributes:
        plan: the :class:`~edgerun.planner.Plan` for this message.
        stats: the reply's :class:`GenerationStats` (TTFT ms, prefill/decode tokens/s, tokens, KV bytes),
            set when the reply ends (stream exhausted, closed or interrupted).
        load_ms: time to open the plan's model when it changed, ms (0 otherwise).
        history: what happened to the conversation's KV cache: ``new`` (first turn), ``kept``,
            ``re-prefilled under the new layout`` or ``re-prefilled into the new model``.
        accounting: engine-specific counters after the reply (e.g. MixPE op counts), or {}.
        thinking: with TrimR (``trim=``), the reply's thinking record
            (:meth:`edgerun.trimr.ThinkingMonitor.record`: thoughts, verifier calls and ms, where and why the
            thinking was closed), else {}.
    """

    plan: Plan
    stats: GenerationStats = field(default_factory=GenerationStats)
    load_ms: float = 0.0
    history: str = "new"
    accounting: dict = field(default_factory=dict)
    thinking: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """JSON-ready form: ``{"plan": ..., "stats": ..., "load_ms": ..., "history": ..., "accounting": ...,
        "thinking": ...}``."""
        return {"plan": self.plan.as_dict(), "stats": self.stats.as_dict(), "load_ms": self.load_ms,
                "history": self.history, "accounting": self.accounting, "thinking": self.thinking}


def check_text(text, what: str = "message") -> None:
    """Refuse text that cannot reach a tokenizer: not a ``str``, or not encodable as UTF-8.

    Lone surrogates come from bytes that are not UTF-8 (Python decodes stdin, files and arguments with
    ``surrogateescape``: byte 0xff becomes U+DCFF) or from a caller's string; every engine's tokenizer
    takes UTF-8 and would fail deep inside with a traceback. Other text (NUL, control and bidi
    characters, a BOM) is valid and is tokenized as it is.

    Raises:
        UsageError: naming the first offending character's position and, for escaped bytes, the byte.
    """
    if not isinstance(text, str):
        raise UsageError(f"the {what} must be text (str), not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        ch = ord(text[e.start])
        what_char = f"byte 0x{ch - 0xDC00:02x}" if 0xDC80 <= ch <= 0xDCFF else f"lone surrogate U+{ch:04X}"
        raise UsageError(f"the {what} is not valid UTF-8 text: {what_char} at character {e.start}; "
                         "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


class Session:
    """A multi-turn chat with one loaded model, planned per message.

    Args:
        backend: the loaded model.
        template: chat template used to format the conversation.
        system: optional system prompt, kept through every context trim.
        sampling: sampling parameters for every reply.
        notify: called with a one-line message when the session must tell the user something
            (e.g. that old turns were dropped); default: collected in ``notices``.
        planner: makes one :class:`~edgerun.planner.Plan` per message (default: the loaded model as is).
        open_model: opens a plan's model when it differs from the loaded one (adaptive experts).
        trim: TrimR (:class:`edgerun.trimr.TrimConfig`, its ``verifier`` an object, not a name): trim the
            thinking of a reasoning model while it streams; None: replies run untouched.

    Attributes:
        messages: the conversation so far, dicts with ``role`` and ``content``.
        turns: one :class:`Turn` per reply (plan + stats).
        last_prompt: the formatted prompt text of the last reply.
        notices: messages for the user when ``notify`` is not given.
    """

    def __init__(self, backend: Backend, template: ChatTemplate, system: str | None = None,
                 sampling: SamplingParams | None = None, notify: Callable[[str], None] | None = None,
                 planner: Planner | None = None, open_model: Callable[[Plan], Backend] | None = None,
                 trim=None):
        if system is not None:
            check_text(system, "system prompt")
        self.backend, self.template = backend, template
        self.planner = planner or Planner(backend.name, 0, settings=backend.engine_settings())
        self._open_model = open_model
        self.trim = trim
        self._busy_workers: list = []     # TrimR verifier threads still in a call when their reply ended
        self.turns: list[Turn] = []
        self.system = system
        self.sampling = sampling or SamplingParams()
        self.notices: list[str] = []
        self._notify = notify or self.notices.append
        self._told_trim = False
        self._told_clamp = False
        self.messages: list[dict] = []
        self.last_prompt = ""
        self.clear()

    def close(self) -> None:
        """Free the engine and, with TrimR, the verifier's model (after joining any verifier thread still in a
        call, so no thread runs inside a freed model)."""
        for w in self._busy_workers:
            w.close(timeout=60.0)
        self._busy_workers = [w for w in self._busy_workers if w.alive]
        self.backend.close()
        verifier = getattr(self.trim, "verifier", None)
        if hasattr(verifier, "close") and not self._busy_workers:
            verifier.close()

    # --- conversation ---------------------------------------------------------------------------

    def clear(self) -> None:
        """Forget every turn, its record and the engine's KV cache (the system prompt stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.turns = []
        self.backend.reset()
        self._told_trim = False
        self.backend.last_stats = GenerationStats(context_size=self.backend.n_ctx)

    @property
    def stats(self) -> GenerationStats:
        """Timing and token counts of the last reply (TTFT ms, prefill and decode tokens/s, context used)."""
        return self.backend.last_stats

    @property
    def last_turn(self) -> Turn | None:
        """The record of the last reply (its plan and stats), or None before the first."""
        return self.turns[-1] if self.turns else None

    def format_prompt(self, messages: list[dict] | None = None) -> str:
        """The prompt text the template makes of ``messages`` (default: the current history)."""
        return self.template.render(self.messages if messages is None else messages, add_generation_prompt=True)

    def chat(self, message: str, stream: bool = True) -> Iterator[str] | str:
        """Send a user message and get the reply.

        The planner makes one plan for the message (model or task experts, KV layout, engine
        settings), the session applies it, and the reply's record joins :attr:`turns`. With
        ``stream=True`` returns an iterator of text pieces as they are decoded; the message and the
        reply join the history when the iterator ends or is closed (a reply cut by Ctrl-C keeps what
        was shown). With ``stream=False`` returns the whole reply text (the engine's non-streaming
        path; with TrimR the trimmed stream joined). A reply that fails in the engine leaves the history as it was, and its record says
        ``finish_reason="error"``.

        Raises:
            UsageError: an empty message, text that is not valid Unicode (:func:`check_text`), a system prompt that alone does not fit the context, or a
                plan that does not fit the device's memory budget.
            ChatTemplateError: the template cannot format the conversation.
            BackendError, ModelFileError: the engine fails, or the plan's model cannot be opened (the
                session then runs the model it had, or says it must be reloaded).
        """
        check_text(message, "message")
        if not message.strip():
            raise UsageError("empty message")
        messages, tokens = self._fit(message)
        previous = self.turns[-1].plan if self.turns else None
        budget = reply_budget(self.backend.n_ctx, len(tokens), self.sampling.max_tokens)
        if self.sampling.max_tokens is not None and budget < self.sampling.max_tokens and not self._told_clamp:
            self._notify(f"max_tokens {self.sampling.max_tokens} is more than the context leaves: this reply may "
                         f"take at most {budget} tokens (context {self.backend.n_ctx}, prompt {len(tokens)})")
            self._told_clamp = True
        plan = self.planner.plan(message, len(tokens), budget,
                                 loaded=(self.backend.path, self.backend.memory().model_bytes), previous=previous)
        turn = self._apply(plan)
        self.turns.append(turn)
        if self.trim is not None:
            pieces = self._stream(messages, tokens, turn, self._trimmed(message, tokens, turn))
            return pieces if stream else "".join(pieces)
        if stream:
            return self._stream(messages, tokens, turn)
        try:
            text = self.backend.complete(tokens, self.sampling)
        except Exception:
            self._finish(turn, failed=True)
            raise
        self._finish(turn)
        self.messages = messages + [{"role": "assistant", "content": text}]
        return text

    def _apply(self, plan: Plan) -> Turn:
        """Run what ``plan`` says, in one place: open its model if it is another one, set its KV layout.

        Returns the turn's record, whose ``history`` says what happened to the conversation's cache.
        """
        history = "kept" if any(m["role"] == "assistant" for m in self.messages) else "new"
        turn = Turn(plan, history=history)
        if Path(plan.model_path) != Path(self.backend.path):
            turn.load_ms = self._swap_model(plan)
            if history == "kept":
                turn.history = "re-prefilled into the new model"
            if plan.experts is not None:
                self._notify(f"experts: task '{plan.experts.task}' ({plan.experts.a}/{plan.experts.b}), "
                             "model rebuilt")
        if plan.kv is not None and self.backend.set_kv_layout(plan.kv.layout) and history == "kept" \
                and turn.history == "kept":
            turn.history = "re-prefilled under the new layout"
            self._notify(f"KV layout {plan.kv.layout.name}: the conversation is re-prefilled under it")
        self.backend.last_stats = GenerationStats(context_size=self.backend.n_ctx)
        return turn

    def _swap_model(self, plan: Plan) -> float:
        """Close the loaded model and open the plan's (memory first: never two models at once); ms taken.

        Raises:
            UsageError: the session has no way to open another model.
            EdgerunError: the plan's model cannot be opened; the previous model is reopened (or, if that
                fails too, the session says it must be reloaded).
        """
        if self._open_model is None:
            raise UsageError(f"the plan runs {plan.model_path}, but this session cannot open another model")
        t0 = time.perf_counter()
        previous = dataclasses.replace(plan, model_path=self.backend.path)
        self.backend.close()
        try:
            self.backend = self._open_model(plan)
        except BaseException:
            try:
                self.backend = self._open_model(previous)
            except Exception:
                raise BackendError(f"could not open {plan.model_path} nor reopen {previous.model_path}; "
                                   "load the session again") from None
            raise
        return (time.perf_counter() - t0) * 1e3

    def _finish(self, turn: Turn, failed: bool = False) -> None:
        turn.stats = self.backend.last_stats
        if failed:
            turn.stats.finish_reason = "error"
        turn.accounting = self.backend.accounting()

    def _stream(self, messages: list[dict], tokens: list[int], turn: Turn,
                source: Iterator[str] | None = None) -> Iterator[str]:
        pieces: list[str] = []
        source = self.backend.stream(tokens, self.sampling) if source is None else source
        try:
            for piece in source:
                pieces.append(piece)
                yield piece
        except Exception:
            _close(source)
            self._finish(turn, failed=True)       # the history stays as it was before this message
            raise
        except BaseException:                     # closed (Ctrl-C): keep what was shown
            _close(source)                        # the engine's stream (and a TrimR verifier thread) end first
            if pieces:
                self.messages = messages + [{"role": "assistant", "content": "".join(pieces)}]
            # stopped before its first token: the message leaves no trace in the history, and its
            # partly prefilled tokens are past the history's prefix, so the next turn overwrites them
            self._finish(turn)
            turn.stats.finish_reason = "interrupted"
            raise
        self.messages = messages + [{"role": "assistant", "content": "".join(pieces)}]
        self._finish(turn)

    def _trimmed(self, message: str, tokens: list[int], turn: Turn) -> Iterator[str]:
        """The reply's pieces under TrimR: the engine's stream, stopped where the thinking monitor closes the
        thinking, the injection appended, decoding continued from the kept text (the engine reuses its KV
        cache up to it). Sets ``backend.last_stats`` to the whole reply's (every engine call summed) and
        ``turn.thinking``; the verifier thread is joined however the reply ends."""
        from edgerun.trimr import THINK_OPEN, ThinkingMonitor, VerifierWorker

        budget = reply_budget(self.backend.n_ctx, len(tokens), self.sampling.max_tokens)
        worker = VerifierWorker(self.trim.verifier, message)
        # a template whose generation prompt opens the thinking section (R1/Qwen3 style) starts inside it
        opened = self.last_prompt.rstrip().endswith(THINK_OPEN)
        monitor = ThinkingMonitor(self.trim, worker, budget, state="think" if opened else "pre")
        parts: list[GenerationStats] = []
        kept, prompt = "", list(tokens)
        out_of_budget = False
        try:
            while True:
                left = budget - sum(p.generated_tokens for p in parts)
                if left < 1:
                    out_of_budget = True
                    break
                it = self.backend.stream(prompt, dataclasses.replace(self.sampling, max_tokens=left))
                action = None
                try:
                    for piece in it:
                        shown, action = monitor.feed(piece)
                        if shown:
                            kept += shown
                            yield shown
                        if action is not None:
                            break
                finally:
                    _close(it)
                    parts.append(self.backend.last_stats)
                if action is None:
                    rest = monitor.flush()
                    if rest:
                        kept += rest
                        yield rest
                    break
                kept += action.inject
                yield action.inject
                # the kept text is tokenized again: the engine reuses its KV cache up to the longest common
                # prefix with what it decoded, so only the injection (and any token the text splits
                # differently) is prefilled
                prompt = list(tokens) + self.backend.tokenize_markup(kept)
                if len(prompt) >= self.backend.n_ctx:
                    out_of_budget = True
                    break
        finally:
            if not worker.close():
                self._busy_workers.append(worker)          # a verifier call still runs: joined at close()
            turn.thinking = monitor.record()
            turn.thinking["verifier_thread_left_running"] = worker.alive
            stats = _sum_stats(parts)
            if out_of_budget:
                stats.finish_reason = "length"
            self.backend.last_stats = stats

    # --- context-window policy ------------------------------------------------------------------

    def _reply_room(self) -> int:
        """Tokens kept free for the reply when fitting the history: max_tokens, at most half the context
        (a quarter when unbounded)."""
        n_ctx = self.backend.n_ctx
        if self.sampling.max_tokens is None:
            return n_ctx // 4
        return min(self.sampling.max_tokens, n_ctx // 2)

    def _encode(self, messages: list[dict]) -> list[int]:
        """Prompt tokens of ``messages``: the template's markup as control tokens, every message's content
        as text (a user typing a special-token text gets those characters, not a control token)."""
        for m in messages:     # a history set through the API: the same check as a new message
            if isinstance(m, dict) and isinstance(m.get("content"), str):
                check_text(m["content"], f"{m.get('role')} message")
        parts = self.template.render_parts(messages, add_generation_prompt=True)
        self.last_prompt = "".join(text for text, _ in parts)
        return self.backend.encode_chat(parts)

    def _fit(self, message: str) -> tuple[list[dict], list[int]]:
        """History + the new message, trimmed to fit the context; returns (messages, prompt tokens)."""
        limit = self.backend.n_ctx - self._reply_room()
        head = [m for m in self.messages[:1] if m["role"] == "system"]
        turns = self.messages[len(head):]
        user = {"role": "user", "content": message}
        tokens = self._encode(head + turns + [user])
        dropped = 0
        while len(tokens) > limit and turns:
            # drop the oldest turn: a user message and the replies that follow it
            cut = 1
            while cut < len(turns) and turns[cut]["role"] != "user":
                cut += 1
            turns, dropped = turns[cut:], dropped + 1
            tokens = self._encode(head + turns + [user])
        if dropped and not self._told_trim:
            self._notify(f"context window full ({self.backend.n_ctx} tokens): dropping the oldest turns "
                         "to make room (the system prompt is kept)")
            self._told_trim = True
        if len(tokens) > limit:
            user, tokens = self._cut_message(head, message, limit)
        return head + turns + [user], tokens

    def _cut_message(self, head: list[dict], message: str, limit: int) -> tuple[dict, list[int]]:
        """Keep the end of a message that alone overflows the context."""
        overhead = len(self._encode(head + [{"role": "user", "content": ""}]))
        if overhead >= limit:
            raise UsageError(f"the system prompt and chat template take {overhead} tokens, more than the "
                             f"context of {self.backend.n_ctx} allows with room for a reply; raise --ctx-size")
        body = self.backend.tokenize(message)
        keep = limit - overhead
        while keep > 0:
            user = {"role": "user", "content": self.backend.detokenize(body[-keep:])}
            tokens = self._encode(head + [user])
            if len(tokens) <= limit:
                self._notify(f"message too long for the context: kept its last {keep} of {len(body)} tokens")
                return user, tokens
            keep -= max(1, len(tokens) - limit)
        raise UsageError(f"message does not fit the context of {self.backend.n_ctx} tokens; raise --ctx-size")


def _sum_stats(parts: list[GenerationStats]) -> GenerationStats:
    """One reply's stats from its engine calls (a TrimR reply continues after each injection): the first
    call's prompt and TTFT, every call's prefill, decode and generated tokens summed, the last call's finish
    and context."""
    if not parts:
        return GenerationStats()
    first, last = parts[0], parts[-1]
    out = dataclasses.replace(last, prompt_tokens=first.prompt_tokens, ttft_ms=first.ttft_ms)
    out.prefill_tokens = sum(p.prefill_tokens for p in parts)
    out.generated_tokens = sum(p.generated_tokens for p in parts)
    out.prefill_ms = sum(p.prefill_ms for p in parts)
    out.decode_ms = sum(p.decode_ms for p in parts)
    out.decode_steps = sum(p.decode_steps for p in parts)
    return out


def _close(it) -> None:
    """Close a generator (runs its cleanup now); other iterators have nothing to close."""
    close = getattr(it, "close", None)
    if close is not None:
        close()
