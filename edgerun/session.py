"""A chat session: message history, the model's chat template, the context-window policy, streaming and stats.

Context-window policy: before each reply the whole conversation is formatted with the chat
template and tokenized. If it plus a reply budget (``max_tokens``, at most half the context;
a quarter of the context when unbounded) does not fit, the oldest turns are dropped, the system
prompt always kept, and the user is told once per session. A single message longer than the
context is cut to its last tokens. Generation stops at the end of the context instead of failing.
"""

from __future__ import annotations

from typing import Callable, Iterator

from edgerun.backends.base import Backend, GenerationStats, SamplingParams
from edgerun.errors import UsageError
from edgerun.templates import ChatTemplate


class Session:
    """A multi-turn chat with one loaded model.

    Args:
        backend: the loaded model.
        template: chat template used to format the conversation.
        system: optional system prompt, kept through every context trim.
        sampling: sampling parameters for every reply.
        notify: called with a one-line message when the session must tell the user something
            (e.g. that old turns were dropped); default: collected in ``notices``.

    Attributes:
        messages: the conversation so far, dicts with ``role`` and ``content``.
        last_prompt: the formatted prompt text of the last reply.
        notices: messages for the user when ``notify`` is not given.
    """

    def __init__(self, backend: Backend, template: ChatTemplate, system: str | None = None,
                 sampling: SamplingParams | None = None, notify: Callable[[str], None] | None = None,
                 planner=None, reopen: Callable[[object], Backend] | None = None, kv_planner=None):
        self.backend, self.template = backend, template
        self.planner, self._reopen = planner, reopen
        self.kv_planner = kv_planner
        self.plan = None
        self.plan_stats: dict = {}
        self.kv_plan = None
        self.kv_stats: dict = {}
        self.system = system
        self.sampling = sampling or SamplingParams()
        self.notices: list[str] = []
        self._notify = notify or self.notices.append
        self._told_trim = False
        self.messages: list[dict] = []
        self.last_prompt = ""
        self.clear()

    # --- conversation ---------------------------------------------------------------------------

    def clear(self) -> None:
        """Forget every turn (the system prompt stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.backend.last_stats = GenerationStats(context_size=self.backend.n_ctx)

    @property
    def stats(self) -> GenerationStats:
        """Timing and token counts of the last reply (TTFT ms, prefill and decode tokens/s, context used)."""
        return self.backend.last_stats

    def format_prompt(self, messages: list[dict] | None = None) -> str:
        """The prompt text the template makes of ``messages`` (default: the current history)."""
        return self.template.render(self.messages if messages is None else messages, add_generation_prompt=True)

    def chat(self, message: str, stream: bool = True) -> Iterator[str] | str:
        """Send a user message and get the reply.

        With ``stream=True`` returns an iterator of text pieces as they are decoded; the reply joins
        the history when the iterator ends or is closed (a reply cut by Ctrl-C keeps what was shown).
        With ``stream=False`` returns the whole reply text (the engine's non-streaming path).

        Raises:
            UsageError: an empty message, or a system prompt that alone does not fit the context.
            ChatTemplateError: the template cannot format the conversation.
        """
        if not message or not message.strip():
            raise UsageError("empty message")
        if self.planner is not None:
            self._replan(message)
        messages, tokens = self._fit(message)
        if self.kv_planner is not None:
            self._plan_kv(len(tokens))
        if stream:
            return self._stream(messages, tokens)
        text = self.backend.complete(tokens, self.sampling)
        self.messages = messages + [{"role": "assistant", "content": text}]
        return text

    def _stream(self, messages: list[dict], tokens: list[int]) -> Iterator[str]:
        pieces: list[str] = []
        self.messages = messages
        try:
            for piece in self.backend.stream(tokens, self.sampling):
                pieces.append(piece)
                yield piece
        finally:
            self.messages.append({"role": "assistant", "content": "".join(pieces)})

    def _replan(self, message: str) -> None:
        """PreMoe TAER: retrieve this message's task; on a new task, run the model built for it.

        The new model starts with an empty KV cache: the whole conversation is prefilled into it.
        """
        import time

        plan = self.planner.plan(message)
        load_ms = 0.0
        if plan.changed and str(getattr(self.backend, "path", "")) != str(plan.model_path):
            t0 = time.perf_counter()
            self.backend.close()
            self.backend = self._reopen(plan)
            load_ms = (time.perf_counter() - t0) * 1e3
            self._notify(f"experts: task '{plan.task}' ({plan.a}/{plan.b}), model rebuilt")
        self.plan = plan
        self.plan_stats = {**plan.as_dict(), "load_ms": load_ms,
                           "resident_model_bytes": self.backend.memory().model_bytes}

    def _plan_kv(self, n_prompt: int) -> None:
        """KVTuner per query: the best layout whose cache for prompt + reply fits the device budget.

        A layout change drops the cache: the conversation is re-prefilled under the new layout.
        """
        from edgerun.backends.base import reply_budget

        tokens = n_prompt + reply_budget(self.backend.n_ctx, n_prompt, self.sampling.max_tokens)
        plan = self.kv_planner.choose(tokens)
        self.backend.set_kv_layout(plan.layout)
        if self.kv_plan is None:
            history = "new"
        elif plan.changed:
            history = "re-prefilled under the new layout" if self.backend.kv_note else "new layout (no cache yet)"
        else:
            history = "kept (same layout)"
        if self.backend.kv_note:
            self._notify(f"KV layout {plan.layout.name}: the conversation is re-prefilled under it")
        self.kv_plan = plan
        self.kv_stats = {**plan.as_dict(), "kv_history": history}

    # --- context-window policy ------------------------------------------------------------------

    def _reply_budget(self) -> int:
        n_ctx = self.backend.n_ctx
        if self.sampling.max_tokens is None:
            return n_ctx // 4
        return min(self.sampling.max_tokens, n_ctx // 2)

    def _encode(self, messages: list[dict]) -> list[int]:
        prompt = self.format_prompt(messages)
        self.last_prompt = prompt
        return self.backend.encode_prompt(prompt)

    def _fit(self, message: str) -> tuple[list[dict], list[int]]:
        """History + the new message, trimmed to fit the context; returns (messages, prompt tokens)."""
        limit = self.backend.n_ctx - self._reply_budget()
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
