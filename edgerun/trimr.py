"""TrimR: verifier-based, training-free trimming of chain-of-thought while the model thinks.

Lin et al., "TrimR: Verifier-based Training-Free Thinking Compression for Efficient Test-Time Scaling"
(2025), Sec. 3. While the model is inside its thinking section (``<think>`` ... ``</think>``):

1. **Thoughts.** The stream is split into thoughts at reflection markers: a paragraph (after a blank
   line) that opens with ``Wait``, ``But``, ``Alternatively``, ``Hmm``, ``Let me double-check`` ...
   (:data:`MARKER_RE`). Text that may be the start of a marker is held back until it is decided, so a
   closed thinking section never shows half a marker.
2. **Verifier.** After each thought a verifier answers two questions: does this thought reach an
   answer, and is it the same answer as the previous thought's. :class:`LLMVerifier` asks a small
   instruction model (a second llama.cpp context, no fine-tuning) yes/no questions and reads
   P("Yes") against P("No"); :class:`RuleVerifier` reads ``answer is N`` with a regular expression
   (:func:`edgerun.reasoning.extract_answer`). Verifier calls run on a worker thread
   (:class:`VerifierWorker`): decoding never waits, and a verdict that arrives late applies at the next
   thought boundary.
3. **Rules** (:class:`TrimConfig`): *overthinking*: after ``confirmations`` (M, default 2) consecutive
   thoughts each confirming the previous thought's answer, the thinking is closed (the end-of-thinking
   marker and an answer prompt are injected and the model answers); *underthinking*: past
   ``budget_share`` of the reply budget or ``max_thoughts`` thoughts without that convergence, a
   conclusion prompt is injected and the thinking closed; a *repetition loop* (a word n-gram whose
   rolling hash recurs ``loop_repeats`` times) closes it too.

:class:`ThinkingMonitor` is the per-reply state machine; :class:`edgerun.session.Session` drives it
(``trim=`` a :class:`TrimConfig`): it stops the engine's stream where the monitor says, appends the
injection, and continues decoding from the kept text (the engine reuses its KV cache up to it). The
record of each reply (thoughts, verifier calls and their latency, where and why the thinking was
closed, budget left) is :meth:`ThinkingMonitor.record`, shown by ``/stats``.
"""

from __future__ import annotations

import queue
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from edgerun.errors import UsageError
from edgerun.reasoning import THINK_CLOSE, THINK_OPEN, extract_answer

#: A paragraph opening that starts a new thought (checked right after a blank line).
MARKER_RE = re.compile(r"(?:Wait|But|Alternatively|Hmm|However|Double-checking|Let me (?:double-check|verify|check|"
                       r"re-?check|re-?examine|think again)|Let's (?:verify|check|double-check))\b")
_MARKER_CHARS = 24      # characters after a blank line that decide whether a marker starts there
_CONCLUDE = "\n\nI have thought about this long enough; time to give the final answer."


@dataclass
class TrimConfig:
    """When TrimR closes the thinking (Lin et al. 2025, Sec. 3.2-3.3; defaults from the paper).

    Attributes:
        verifier: ``"rule"`` (regular expression) or an :class:`LLMVerifier` / any object with
            ``judge(question, thought, previous) -> Verdict`` and ``name``.
        confirmations: M: close after M consecutive thoughts each reaching the previous thought's answer.
        budget_share: underthinking: past this share of the reply budget (tokens) without convergence,
            conclude.
        max_thoughts: underthinking: past this many thoughts without convergence, conclude.
        loop_ngram, loop_repeats: a repetition loop: a ``loop_ngram``-word n-gram seen ``loop_repeats``
            times in the thinking.
        answer_prompt: text injected after the end-of-thinking marker (the model completes the answer).
        wait: apply each thought's verdict before decoding on (synchronous). Default (None): synchronous for
            a verifier that says it is cheap (``cheap = True``: the rule verifier, microseconds), asynchronous
            otherwise (the LLM verifier: decoding never waits, a late verdict applies at the next boundary).
        wait_timeout: seconds a synchronous wait may take before decoding goes on without the verdict.

    Raises:
        UsageError: a bad M, share or limit, or a verifier given by a name other than ``"rule"`` (names of
            models are opened by :func:`make_verifier` / ``edgerun.load``).
    """

    verifier: object = "rule"
    confirmations: int = 2
    budget_share: float = 0.5
    max_thoughts: int = 20
    loop_ngram: int = 24
    loop_repeats: int = 5
    answer_prompt: str = "The answer is"
    wait: bool | None = None
    wait_timeout: float = 10.0

    def __post_init__(self):
        if isinstance(self.verifier, str):
            if self.verifier != "rule":
                raise UsageError(f"TrimConfig takes a verifier object or 'rule', not {self.verifier!r}; "
                                 "make_verifier() opens a model by name")
            self.verifier = RuleVerifier()
        if self.wait is None:
            self.wait = bool(getattr(self.verifier, "cheap", False))
        if self.confirmations < 1:
            raise UsageError("--trim-confirmations must be >= 1")
        if not 0 < self.budget_share <= 1:
            raise UsageError("the underthinking budget share must be in (0, 1]")
        if self.max_thoughts < 1 or self.loop_ngram < 2 or self.loop_repeats < 2:
            raise UsageError("max_thoughts must be >= 1, loop_ngram and loop_repeats >= 2")


def check_template(template_source: str | None, model_label: str = "the model") -> None:
    """Refuse ``--trim-thinking`` for a model whose chat template does not know the thinking markers.

    Raises:
        UsageError: the template (Jinja text) mentions neither ``<think>`` nor ``</think>``.
    """
    if not template_source or THINK_CLOSE not in template_source and THINK_OPEN not in template_source:
        raise UsageError(f"--trim-thinking needs a reasoning model whose chat template knows the thinking markers "
                         f"{THINK_OPEN} ... {THINK_CLOSE}; the template of {model_label} has neither")


# --- verifiers ----------------------------------------------------------------------------------------

@dataclass
class Verdict:
    """A verifier's answer for one thought.

    Attributes:
        index: the thought's index in the reply (0-based).
        reaches_answer: the thought reaches an answer.
        same_as_previous: it is the previous thought's answer (None: not asked, the previous thought
            reached none or this is the first).
        answer: the answer read (rule verifier), else None.
        ms: wall time of the call(s), ms.
        calls: verifier questions asked (0-2).
    """

    index: int
    reaches_answer: bool
    same_as_previous: bool | None
    answer: str | None = None
    ms: float = 0.0
    calls: int = 0


class Verifier(Protocol):
    """What the worker calls per thought: ``judge`` returns a :class:`Verdict` (its ``index`` is set by the
    worker); ``previous`` is the verdict of the thought before, ``previous_text`` its text. ``cheap = True``
    makes TrimR apply its verdicts synchronously."""

    name: str

    def judge(self, question: str, thought: str, previous: "Verdict | None", previous_text: str) -> Verdict: ...


class RuleVerifier:
    """The cheap verifier: the last ``answer is N`` of a thought (:func:`edgerun.reasoning.extract_answer`).

    Reaches an answer when one is found; the same answer when it equals the previous thought's.
    """

    name = "rule"
    cheap = True

    def judge(self, question: str, thought: str, previous: Verdict | None, previous_text: str) -> Verdict:
        t0 = time.perf_counter()
        ans = extract_answer(thought)
        same = None
        if ans is not None and previous is not None and previous.reaches_answer:
            same = ans == previous.answer
        return Verdict(-1, ans is not None, same, ans, (time.perf_counter() - t0) * 1e3, 1)


_Q_ANSWER = ("Here is a problem and one step of someone's reasoning about it.\n\nProblem: {question}\n\n"
             "Reasoning step: {thought}\n\nDoes this reasoning step state a final answer to the problem? "
             "Answer Yes or No.")
_Q_SAME = ("Here is a problem and two steps of someone's reasoning about it.\n\nProblem: {question}\n\n"
           "Step A: {previous}\n\nStep B: {thought}\n\nDo step A and step B reach the same final answer? "
           "Answer Yes or No.")


class LLMVerifier:
    """A small instruction model as verifier: yes/no questions read from P("Yes") vs P("No").

    The model's chat template formats each question as a user turn; after the assistant header, the
    log-probabilities of the continuations ``Yes`` and ``No`` are compared. With ``calibrate`` (default),
    the log-odds the same question gives a content-free step (``N/A``) is subtracted first (contextual
    calibration: Zhao et al., "Calibrate Before Use", ICML 2021), because a small model leans to one word
    whatever it reads. TrimR uses a 7B instruct model; here the verifier is the default SmolLM2-135M-Instruct.

    Args:
        backend: a loaded :class:`~edgerun.backends.base.Backend` (a second llama.cpp context), used only
            from the worker thread.
        template: its :class:`~edgerun.templates.ChatTemplate`.
        max_chars: each text is cut to its last ``max_chars`` characters (bounds the call's prefill).
        calibrate: subtract the log-odds of the same question with every text replaced by ``N/A``
            (computed once per question kind).

    Calls are serialised by a lock (one llama.cpp context is never used by two threads).

    Raises:
        UsageError: the model's tokenizer turns ``Yes`` or ``No`` into no token (multi-token words are
            scored as the sum of their tokens' log-probabilities).
    """

    name = "llm"

    def __init__(self, backend, template, max_chars: int = 1200, calibrate: bool = True, label: str = ""):
        self.backend, self.template, self.max_chars, self.calibrate = backend, template, max_chars, calibrate
        self.label = label or str(getattr(backend, "path", ""))
        self._yes, self._no = backend.tokenize("Yes"), backend.tokenize("No")
        if not self._yes or not self._no:
            raise UsageError("the verifier model's tokenizer cannot write Yes/No")
        self._bias: dict[str, float] = {}
        self._lock = threading.Lock()

    def _log_odds(self, prompt: str) -> float:
        parts = self.template.render_parts([{"role": "system", "content": "Answer Yes or No."},
                                            {"role": "user", "content": prompt}], add_generation_prompt=True)
        ctx = self.backend.encode_chat(parts)
        yes, no = self.backend.continuation_logprobs(ctx, [self._yes, self._no])
        return float(yes.sum() - no.sum())

    def _ask(self, kind: str, fmt: str, question: str, **texts: str) -> bool:
        cut = {k: v[-self.max_chars:] for k, v in texts.items()}
        score = self._log_odds(fmt.format(question=question[-self.max_chars:], **cut))
        if self.calibrate:
            if kind not in self._bias:
                self._bias[kind] = self._log_odds(fmt.format(question="N/A", **{k: "N/A" for k in texts}))
            score -= self._bias[kind]
        return score > 0

    def judge(self, question: str, thought: str, previous: Verdict | None, previous_text: str) -> Verdict:
        with self._lock:
            return self._judge(question, thought, previous, previous_text)

    def _judge(self, question: str, thought: str, previous: Verdict | None, previous_text: str) -> Verdict:
        t0 = time.perf_counter()
        reaches = self._ask("answer", _Q_ANSWER, question, thought=thought)
        same, calls = None, 1
        if reaches and previous is not None and previous.reaches_answer:
            same = self._ask("same", _Q_SAME, question, thought=thought, previous=previous_text)
            calls = 2
        return Verdict(-1, reaches, same, None, (time.perf_counter() - t0) * 1e3, calls)

    def close(self) -> None:
        """Free the verifier's model (after the call in flight, if any)."""
        with self._lock:
            self.backend.close()


def open_llm_verifier(model: str | None = None, threads: int = 1, n_ctx: int = 2048) -> LLMVerifier:
    """An :class:`LLMVerifier` on ``model`` (catalog name or GGUF path; default: the catalog's default model).

    Raises:
        EdgerunError: the verifier model cannot be found, pulled or loaded (the message says "verifier").
    """
    from edgerun import catalog, templates
    from edgerun.backends import open_backend
    from edgerun.errors import EdgerunError
    from edgerun.formats import gguf as gguf_format

    label = model or catalog.DEFAULT_MODEL
    try:
        path = catalog.resolve(label, progress=False)
        info = gguf_format.validate(path)
        backend = open_backend("llama.cpp", path, n_ctx=n_ctx, threads=threads, info=info, notify=lambda m: None)
    except EdgerunError as e:
        raise type(e)(f"the TrimR verifier model {label} cannot be loaded: {e}") from None
    try:
        special = backend.special_tokens
        template = templates.choose(backend.chat_template, None, model_label=f"the TrimR verifier {label}",
                                    bos_token=special["bos_token"], eos_token=special["eos_token"])
        return LLMVerifier(backend, template, label=label)
    except BaseException:
        backend.close()
        raise


class VerifierWorker:
    """Runs a verifier on its own thread: :meth:`submit` returns at once, :meth:`ready` collects verdicts.

    Thoughts are judged in order; each sees the verdict and text of the one before. :meth:`close`
    stops the thread (after the call in flight, if any) and joins it: no thread is left behind.
    """

    def __init__(self, verifier, question: str):
        self.verifier, self.question = verifier, question
        self._jobs: queue.Queue = queue.Queue()
        self._done: list[Verdict] = []
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._run, name="trimr-verifier", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        previous, previous_text = None, ""
        while True:
            job = self._jobs.get()
            if job is None:
                return
            index, thought = job
            try:
                v = self.verifier.judge(self.question, thought, previous, previous_text)
            except Exception as e:  # a failing verifier never breaks the reply: the thought counts as no answer
                self.errors.append(f"{type(e).__name__}: {e}")
                v = Verdict(-1, False, None)
            v.index = index
            previous, previous_text = v, thought
            with self._lock:
                self._done.append(v)
                if self._jobs.empty():
                    self._idle.set()

    def submit(self, index: int, thought: str) -> None:
        """Queue thought ``index`` for judging (returns at once)."""
        with self._lock:
            self._idle.clear()
            self._jobs.put((index, thought))

    def ready(self) -> list[Verdict]:
        """Verdicts that arrived since the last call, in thought order."""
        with self._lock:
            out, self._done = self._done, []
        return out

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every submitted thought is judged (synchronous mode), at most ``timeout`` seconds;
        False on timeout."""
        return self._idle.wait(timeout)

    def close(self, timeout: float = 30.0) -> bool:
        """Stop after the call in flight and join the thread, waiting at most ``timeout`` seconds.

        Returns True when the thread ended (False: a verifier call still runs; the thread is a daemon and
        ends after it, and the session joins it again before closing the verifier)."""
        while True:  # drop queued jobs: the reply is over
            try:
                self._jobs.get_nowait()
            except queue.Empty:
                break
        self._jobs.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


# --- the per-reply state machine ---------------------------------------------------------------------

@dataclass
class Action:
    """What the session must do: stop decoding, append ``inject`` to the kept text and decode on.

    Attributes:
        reason: ``overthinking``, ``underthinking`` or ``loop``.
        inject: text appended after the kept reply (conclusion prompt, end-of-thinking marker, answer prompt).
    """

    reason: str
    inject: str


@dataclass
class ThinkingMonitor:
    """Follows one reply's stream, splits its thinking into thoughts and decides when to close it.

    Args:
        config: the :class:`TrimConfig`.
        worker: the :class:`VerifierWorker` of this reply.
        budget_tokens: the reply's token budget (max_tokens capped by the context).

    Feed it every piece the engine yields (:meth:`feed`); it returns the text to show now (a possible
    marker start is held back) and an :class:`Action` when the thinking must close. :meth:`flush`
    returns the held-back text at the end of the stream. ``tokens`` counts pieces fed (an engine yields
    about one per token; llama.cpp and torch merge the pieces of a multi-byte character), the unit of the
    underthinking share and of ``closed_at_token``. Start with ``state="think"`` when the prompt itself
    opens the thinking section (templates that end the generation prompt with ``<think>``).
    """

    config: TrimConfig
    worker: VerifierWorker
    budget_tokens: int
    state: str = "pre"                  # pre (before <think>), think, post (after </think>)
    tokens: int = 0
    thoughts: list[str] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    confirmations: int = 0
    closed: str = ""                    # why the thinking ended: overthinking, underthinking, loop, model, none
    closed_at_token: int = 0
    closed_at_thought: int = 0
    _pending: str = ""
    _thought: str = ""
    _words: list[str] = field(default_factory=list)
    _ngram_counts: dict = field(default_factory=dict)
    _word_tail: str = ""

    # -- verdicts --
    def _apply_verdicts(self) -> None:
        for v in self.worker.ready():
            self.verdicts.append(v)
            if v.reaches_answer and v.same_as_previous:
                self.confirmations += 1
            elif v.reaches_answer:
                self.confirmations = 0   # a first or a new answer: the count starts again
            else:
                self.confirmations = 0

    def _decide(self) -> Action | None:
        """At a thought boundary: close for overthinking, underthinking or none."""
        if self.config.wait:
            self.worker.wait_idle(self.config.wait_timeout)
        self._apply_verdicts()
        if self.confirmations >= self.config.confirmations:
            return self._close("overthinking", "")
        over_budget = self.tokens >= self.config.budget_share * self.budget_tokens
        if over_budget or len(self.thoughts) >= self.config.max_thoughts:
            return self._close("underthinking", _CONCLUDE)
        return None

    def _close(self, reason: str, prefix: str) -> Action:
        self.closed, self.closed_at_token, self.closed_at_thought = reason, self.tokens, len(self.thoughts)
        self.state = "post"
        self._pending = ""
        return Action(reason, f"{prefix}\n{THINK_CLOSE}\n{self.config.answer_prompt}")

    # -- the loop detector: rolling hashes of word n-grams --
    def _loop(self, text: str) -> bool:
        words = (self._word_tail + text).split(" ")
        self._word_tail = words.pop()            # the last word may continue in the next piece
        n = self.config.loop_ngram
        for w in words:
            if not w:
                continue
            self._words.append(w)
            if len(self._words) >= n:
                key = hash(tuple(self._words[-n:]))
                c = self._ngram_counts.get(key, 0) + 1
                self._ngram_counts[key] = c
                if c >= self.config.loop_repeats:
                    return True
        return False

    def _end_thought(self, text: str, judge: bool = True) -> None:
        self.thoughts.append(text)
        if judge:      # the thought the model ends with its own </think> needs no verdict: nothing is left to trim
            self.worker.submit(len(self.thoughts) - 1, text)

    def feed(self, piece: str) -> tuple[str, Action | None]:
        """Take one decoded piece (one token's text); return (text to show now, action or None)."""
        self.tokens += 1
        self._pending += piece
        out = []
        while self._pending:
            if self.state == "pre":
                i = self._pending.find(THINK_OPEN)
                if i >= 0:
                    out.append(self._pending[:i + len(THINK_OPEN)])
                    self._pending = self._pending[i + len(THINK_OPEN):]
                    self.state = "think"
                    continue
                keep = _partial_suffix(self._pending, (THINK_OPEN,))
                out.append(self._pending[:len(self._pending) - keep])
                self._pending = self._pending[len(self._pending) - keep:]
                break
            if self.state == "post":
                out.append(self._pending)
                self._pending = ""
                break
            # thinking
            j = self._pending.find(THINK_CLOSE)
            k = self._pending.find("\n\n")
            if j >= 0 and (k < 0 or j < k):
                self._thought += self._pending[:j]
                self._end_thought(self._thought, judge=False)
                self._thought = ""
                self.closed, self.closed_at_token, self.closed_at_thought = "model", self.tokens, len(self.thoughts)
                out.append(self._pending[:j + len(THINK_CLOSE)])
                self._pending = self._pending[j + len(THINK_CLOSE):]
                self.state = "post"
                continue
            if k < 0:
                keep = _partial_suffix(self._pending, (THINK_CLOSE, "\n\n"))
                safe = self._pending[:len(self._pending) - keep]
                out.append(safe)
                self._thought += safe
                self._pending = self._pending[len(self._pending) - keep:]
                break
            after = self._pending[k + 2:].lstrip("\n")
            if len(after) < _MARKER_CHARS and "\n" not in after and "." not in after:
                safe = self._pending[:k]
                out.append(safe)
                self._thought += safe
                self._pending = self._pending[k:]
                break                                  # wait for enough text to decide
            if MARKER_RE.match(after):                 # a new thought starts: the current one is complete
                head = self._pending[:k]
                self._thought += head
                self._end_thought(self._thought)
                self._thought = ""
                action = self._decide()
                if action is not None:
                    out.append(head)                   # the end of the thought is shown; the marker is dropped
                    return "".join(out), action
                out.append(self._pending[:k + 2])
                self._pending = self._pending[k + 2:]
                continue
            out.append(self._pending[:k + 2])
            self._thought += self._pending[:k + 2]
            self._pending = self._pending[k + 2:]
        shown = "".join(out)
        if self.state == "think" and shown:
            if self._loop(shown):
                return shown, self._close("loop", "")
            if "\n" in shown and self.tokens >= self.config.budget_share * self.budget_tokens:
                # a long thought without markers: underthinking is checked at line ends too
                self._end_thought(self._thought, judge=False)   # held-back text (a marker start) is dropped
                return shown, self._close("underthinking", _CONCLUDE)
        return shown, None

    def flush(self) -> str:
        """The held-back text at the end of the stream (a ``</think>`` held back there still ends the thinking)."""
        out, self._pending = self._pending, ""
        if self.state == "think":
            j = out.find(THINK_CLOSE)
            if j >= 0:
                self._end_thought(self._thought + out[:j], judge=False)
                self._thought = ""
                self.closed, self.closed_at_token, self.closed_at_thought = "model", self.tokens, len(self.thoughts)
                self.state = "post"
            elif not self.closed:
                self.closed = "none"
        return out

    def record(self) -> dict:
        """JSON-ready record of the reply's thinking: thoughts, verifier calls (count, ms), where and why it closed."""
        self._apply_verdicts()
        ms = [v.ms for v in self.verdicts]
        calls = sum(v.calls for v in self.verdicts)
        verifier = self.config.verifier if isinstance(self.config.verifier, str) else self.config.verifier.name
        return {"verifier": verifier, "thoughts": len(self.thoughts), "verdicts": len(self.verdicts),
                "verifier_calls": calls, "verifier_ms_total": round(sum(ms), 1),
                "verifier_ms_mean": round(sum(ms) / len(ms), 1) if ms else None,
                "pending_at_close": len(self.thoughts) - len(self.verdicts),
                "closed": self.closed or ("none" if self.state != "pre" else "no thinking"),
                "closed_at_token": self.closed_at_token, "closed_at_thought": self.closed_at_thought,
                "budget_tokens": self.budget_tokens,
                # the tokens the untrimmed reply could still have spent: the saving against the budget
                "budget_left_at_close": (self.budget_tokens - self.closed_at_token
                                         if self.closed in ("overthinking", "underthinking", "loop") else None),
                "verifier_errors": list(self.worker.errors)}


def _partial_suffix(text: str, needles: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``needles``."""
    best = 0
    for needle in needles:
        for n in range(min(len(needle) - 1, len(text)), 0, -1):
            if text.endswith(needle[:n]):
                best = max(best, n)
                break
    return best


def make_verifier(spec) -> object:
    """A verifier from ``spec``: ``"rule"``, ``"llm"`` (the default model) or a model name/path, or an object."""
    if not isinstance(spec, str):
        return spec
    if spec == "rule":
        return RuleVerifier()
    return open_llm_verifier(None if spec == "llm" else spec)
