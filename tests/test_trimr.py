"""TrimR (edgerun/trimr.py and the session's trimmed stream): thought splitting, the closing rules on
scripted verdicts, the asynchronous verifier, Ctrl-C, and the bad-input paths.

Fast tests run over a scripted engine (a token is a character, the reply a fixed text continued after
any injection) and scripted verifiers; the tests on real models are marked slow.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator, Sequence

import pytest

from edgerun import reasoning, templates, trimr
from edgerun.backends.base import GenerationStats, SamplingParams
from edgerun.errors import EdgerunError, UsageError
from edgerun.session import Session
from edgerun.trimr import ThinkingMonitor, TrimConfig, Verdict, VerifierWorker

from test_serve import ScriptedBackend

THOUGHTS = ["Step 1: 2 + 3 = 5.\nSo the answer is 5.",
            "Wait, let me double-check. 2 + 3 = 5. The answer is 5.",
            "Let me verify once more. 2 + 3 = 5. The answer is 5.",
            "Alternatively, 5 - 3 = 2. The answer is 5.",
            "Hmm, 2 + 3 is 5. The answer is 5."]
REPLY = "<think>\n" + "\n\n".join(THOUGHTS) + "\n</think>\nThe answer is 5."


def pieces(text: str, size: int = 3) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


class Scripted:
    """A verifier whose verdicts are scripted per thought index: (reaches_answer, same_as_previous)."""

    name = "scripted"

    def __init__(self, script: dict[int, tuple[bool, bool | None]], gate: threading.Event | None = None):
        self.script, self.gate, self.calls = script, gate, 0

    def judge(self, question, thought, previous, previous_text):
        if self.gate is not None:
            assert self.gate.wait(30), "test gate never opened"
        self.calls += 1
        i = self.calls - 1
        reaches, same = self.script.get(i, (False, None))
        return Verdict(-1, reaches, same, None, 0.0, 1)


def run(monitor: ThinkingMonitor, text: str, size: int = 3):
    shown, action = [], None
    for p in pieces(text, size):
        s, action = monitor.feed(p)
        shown.append(s)
        if action is not None:
            break
    if action is None:
        shown.append(monitor.flush())
    return "".join(shown), action


def monitor_for(verifier, **kw) -> ThinkingMonitor:
    cfg = TrimConfig(verifier=verifier, **kw)
    return ThinkingMonitor(cfg, VerifierWorker(verifier, "q"), budget_tokens=10_000)


@pytest.mark.parametrize("size", [1, 3, 7, 50])
def test_thoughts_are_split_at_reflection_markers_and_nothing_is_lost(size):
    m = monitor_for(Scripted({}), confirmations=99)
    shown, action = run(m, REPLY, size)
    m.worker.close()
    assert action is None and shown == REPLY
    assert [t.strip() for t in m.thoughts] == THOUGHTS
    assert m.closed == "model"


@pytest.mark.parametrize("size", [1, 2, 5, 13, 50, 120, 400])
def test_a_trim_keeps_every_character_before_the_cut_whatever_the_piece_size(size):
    m = monitor_for(trimr.RuleVerifier())            # cheap: judged synchronously by default
    assert m.config.wait
    shown, action = run(m, REPLY, size)
    m.worker.close()
    assert action is not None and action.reason == "overthinking"
    assert shown == "<think>\n" + "\n\n".join(THOUGHTS[:3])
    assert m.closed_at_thought == 3


def test_a_held_back_end_of_thinking_still_ends_it_at_the_end_of_the_stream():
    m = monitor_for(trimr.RuleVerifier(), confirmations=99)
    for p in ["<think>\nStep 1.", "\n\n</thi", "nk>"]:
        m.feed(p)
    rest = m.flush()
    m.worker.close()
    assert rest.endswith("</think>") and m.closed == "model" and len(m.thoughts) == 1


def test_every_reflection_marker_of_the_testbed_starts_a_thought():
    for marker in reasoning.REFLECTION_MARKERS:
        assert trimr.MARKER_RE.match(marker + ", x"), marker


def test_config_defaults_and_refusals():
    cfg = TrimConfig()
    assert isinstance(cfg.verifier, trimr.RuleVerifier) and cfg.wait is True
    assert TrimConfig(verifier=Scripted({})).wait is False          # an LLM-like verifier runs asynchronously
    with pytest.raises(UsageError, match="verifier object"):
        TrimConfig(verifier="llm")


def test_reply_stats_sum_every_engine_call():
    from edgerun.session import _sum_stats

    a = GenerationStats(prompt_tokens=10, prefill_tokens=10, generated_tokens=5, ttft_ms=3.0, prefill_ms=2.0,
                        decode_ms=4.0, decode_steps=4, finish_reason="interrupted", context_used=15)
    b = GenerationStats(prompt_tokens=20, prefill_tokens=4, generated_tokens=3, ttft_ms=9.0, prefill_ms=1.0,
                        decode_ms=2.0, decode_steps=2, finish_reason="stop", context_used=23)
    c = _sum_stats([a, b])
    assert (c.prompt_tokens, c.prefill_tokens, c.generated_tokens, c.ttft_ms) == (10, 14, 8, 3.0)
    assert (c.prefill_ms, c.decode_ms, c.decode_steps, c.finish_reason, c.context_used) == (3.0, 6.0, 6, "stop", 23)


def test_a_blank_line_without_a_marker_stays_in_the_thought():
    text = "<think>\nStep 1.\n\nStep 2 follows.\n\nWait, step 3.\n</think>\nDone."
    m = monitor_for(Scripted({}), confirmations=99)
    shown, _ = run(m, text, 2)
    m.worker.close()
    assert shown == text
    assert [t.strip() for t in m.thoughts] == ["Step 1.\n\nStep 2 follows.", "Wait, step 3."]


def test_m2_closes_exactly_at_the_second_confirmation():
    # thought 0 answers, 1 confirms (1), 2 confirms (2): closed at the boundary after thought 2
    m = monitor_for(Scripted({0: (True, None), 1: (True, True), 2: (True, True), 3: (True, True)}),
                    confirmations=2, wait=True)
    shown, action = run(m, REPLY)
    m.worker.close()
    assert action is not None and action.reason == "overthinking"
    assert len(m.thoughts) == 3 and m.closed_at_thought == 3
    assert action.inject.endswith("\n</think>\nThe answer is")
    assert shown == "<think>\n" + "\n\n".join(THOUGHTS[:3])      # the next marker was held back, not shown


def test_a_new_answer_resets_the_count():
    # 0 answers, 1 confirms, 2 a different answer (reset), 3 confirms, 4 confirms -> closed after 4 (never: end)
    m = monitor_for(Scripted({0: (True, None), 1: (True, True), 2: (True, False), 3: (True, True)}),
                    confirmations=2, wait=True)
    _, action = run(m, REPLY)
    m.worker.close()
    assert action is None and m.closed == "model" and m.confirmations == 1


def test_thoughts_without_an_answer_never_close_for_overthinking():
    m = monitor_for(Scripted({}), confirmations=1, wait=True)
    _, action = run(m, REPLY)
    m.worker.close()
    assert action is None


def test_underthinking_concludes_past_the_thought_limit_or_the_budget_share():
    m = monitor_for(Scripted({}), max_thoughts=2, wait=True)
    _, action = run(m, REPLY)
    m.worker.close()
    assert action.reason == "underthinking" and m.closed_at_thought == 2
    assert "final answer" in action.inject and "</think>" in action.inject
    cfg = TrimConfig(verifier=Scripted({}), budget_share=0.5, wait=True)
    budget = len(pieces(REPLY))
    m = ThinkingMonitor(cfg, VerifierWorker(cfg.verifier, "q"), budget_tokens=budget)
    _, action = run(m, REPLY)
    m.worker.close()
    assert action.reason == "underthinking" and budget / 2 <= m.closed_at_token < budget / 2 + 60 // 3
    assert 1 <= m.closed_at_thought < len(THOUGHTS)                             # the first boundary past 50%


def test_a_repetition_loop_stops_the_thinking():
    loop = "<think>\n" + "I add two and three and get five, then I add two and three again. " * 20
    m = monitor_for(Scripted({}), loop_ngram=12, loop_repeats=3)
    _, action = run(m, loop)
    m.worker.close()
    assert action is not None and action.reason == "loop"


def test_the_verifier_never_blocks_decoding_and_a_late_verdict_applies_at_the_next_boundary():
    gate = threading.Event()
    verifier = Scripted({i: (True, None if i == 0 else True) for i in range(8)}, gate)
    m = monitor_for(verifier, confirmations=2)
    text = "<think>\n" + "\n\n".join(THOUGHTS + ["Wait, once more: 5. The answer is 5."]) + "\n</think>\nThe answer is 5."
    cut = text.index("Hmm") + 30         # past the 5th thought's marker: 4 thoughts submitted, none judged yet
    for p in pieces(text[:cut]):
        _, action = m.feed(p)            # returns although every verifier call is blocked
        assert action is None
    assert len(m.thoughts) == 4 and verifier.calls == 0 and m.verdicts == []
    gate.set()                           # the verdicts arrive while thought 4 streams ...
    assert m.worker.wait_idle(30)
    action = None
    for p in pieces(text[cut:]):         # ... and apply at the next boundary, the one after thought 4
        _, action = m.feed(p)
        if action is not None:
            break
    m.worker.close()
    assert action is not None and action.reason == "overthinking" and m.closed_at_thought == 5
    assert m.record()["pending_at_close"] == 1        # thought 4 itself was not judged when it closed


def test_a_failing_verifier_never_breaks_the_reply():
    class Broken:
        name = "broken"

        def judge(self, *a):
            raise RuntimeError("verifier died")

    m = monitor_for(Broken(), wait=True)
    shown, action = run(m, REPLY)
    m.worker.close()
    assert shown == REPLY and action is None
    assert m.record()["verifier_errors"][0].startswith("RuntimeError")


def test_rule_verifier():
    v = trimr.RuleVerifier()
    first = v.judge("q", THOUGHTS[0], None, "")
    assert first.reaches_answer and first.answer == "5" and first.same_as_previous is None
    second = v.judge("q", "Wait, 2 + 3 = 6. The answer is 6.", first, THOUGHTS[0])
    assert second.reaches_answer and second.same_as_previous is False
    assert not v.judge("q", "Wait, let me think.", first, "").reaches_answer


# --- the session over a scripted engine -----------------------------------------------------------------

class ThinkingEngine(ScriptedBackend):
    """test_serve's scripted engine (a token is a character) whose reply is ``REPLY`` continued from whatever
    the prompt already holds of it; after an injected end of thinking it answers `` 5.``."""

    def __init__(self, n_ctx: int = 4096):
        super().__init__(REPLY, n_ctx)

    def stream(self, prompt_tokens: Sequence[int], sampling: SamplingParams) -> Iterator[str]:
        text = self.detokenize(prompt_tokens)
        self.prompts.append(text)
        kept = text.rsplit("<|im_start|>assistant\n", 1)[1]      # this reply so far
        rest = " 5." if kept.endswith("The answer is") else REPLY[len(kept):] if REPLY.startswith(kept) else ""
        stats = GenerationStats(prompt_tokens=len(prompt_tokens), prefill_tokens=len(prompt_tokens),
                                context_size=self.n_ctx, ttft_ms=1.0, decode_ms=1.0)
        n, finish = 0, "interrupted"
        try:
            for ch in rest[:sampling.max_tokens]:
                n += 1
                yield ch
            finish = "stop"
        finally:
            stats.generated_tokens, stats.finish_reason = n, finish
            stats.context_used = len(prompt_tokens) + n
            self.last_stats = stats


def session_with(verifier="rule", n_ctx=4096, **kw) -> tuple[Session, ThinkingEngine]:
    engine = ThinkingEngine(n_ctx)
    template = templates.ChatTemplate(reasoning.SYSTEM2_CHAT_TEMPLATE, "system2")
    verifier = trimr.RuleVerifier() if verifier == "rule" else verifier
    s = Session(engine, template, sampling=SamplingParams(temperature=0.0, seed=0, max_tokens=2000),
                trim=TrimConfig(verifier=verifier, **kw))
    return s, engine


def test_a_trimmed_reply_ends_with_an_answer_and_joins_the_history():
    s, engine = session_with()
    reply = "".join(s.chat("What is 2 + 3?"))
    assert reply == "<think>\n" + "\n\n".join(THOUGHTS[:3]) + "\n</think>\nThe answer is 5."
    assert reasoning.final_answer(reply) == "5"
    t = s.last_turn.thinking
    assert t["closed"] == "overthinking" and t["thoughts"] == 3 and t["verifier"] == "rule"
    assert t["budget_left_at_close"] == 2000 - t["closed_at_token"]
    assert len(engine.prompts) == 2 and engine.prompts[1].endswith("\n</think>\nThe answer is")
    st = s.last_turn.stats
    # the injection is prefilled, not generated; the held-back start of the dropped marker was generated
    assert 0 <= st.generated_tokens - (len(reply) - len("\n</think>\nThe answer is")) <= 2 + trimr._MARKER_CHARS
    assert s.messages[-1] == {"role": "assistant", "content": reply}
    assert "".join(s.chat("And 5 + 5?")) is not None                    # the conversation goes on
    assert "<think>" not in s.last_prompt.split("What is 2 + 3?")[1]      # earlier thinking left out (template)
    assert s.chat("Again?", stream=False).endswith("The answer is 5.")


def test_ctrl_c_while_a_verifier_call_runs_keeps_the_partial_reply_and_leaves_no_thread():
    gate = threading.Event()
    s, engine = session_with(Scripted({}, gate))
    assert s.trim.wait is False
    it = s.chat("What is 2 + 3?")
    got = ""
    for piece in it:
        got += piece
        if len(got) > REPLY.index("Let me verify"):   # two thoughts submitted; the first call is blocked
            break
    threading.Timer(0.2, gate.set).start()            # the call in flight ends soon after Ctrl-C
    it.close()                                        # what Ctrl-C does in the CLI
    assert not [t for t in threading.enumerate() if t.name == "trimr-verifier" and t.is_alive()]
    assert s.messages[-1] == {"role": "assistant", "content": got}
    assert s.last_turn.stats.finish_reason == "interrupted"


def test_a_prompt_beyond_the_context_is_refused_with_trimming_on():
    s, _ = session_with(n_ctx=64)
    with pytest.raises(EdgerunError, match="context"):
        "".join(s.chat("x" * 200))


def test_a_template_without_thinking_markers_is_refused():
    with pytest.raises(UsageError, match="<think>"):
        trimr.check_template(templates.BUILTIN_TEMPLATES["chatml"], "chatml-model")
    trimr.check_template(reasoning.SYSTEM2_CHAT_TEMPLATE)
    with pytest.raises(UsageError, match="confirmations"):
        TrimConfig(confirmations=0)


def test_a_verifier_model_that_cannot_be_loaded_is_named(tmp_path):
    bad = tmp_path / "verifier.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 20)
    with pytest.raises(EdgerunError, match="verifier"):
        trimr.make_verifier(str(bad))
    with pytest.raises(EdgerunError, match="verifier"):
        trimr.make_verifier(str(tmp_path / "missing.gguf"))


# --- real models -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_trim_thinking_on_a_model_without_markers_is_a_one_line_error(default_model_path):
    import edgerun

    with pytest.raises(UsageError, match="<think> ... </think>"):
        edgerun.load(str(default_model_path), trim_thinking=True, progress=False)


@pytest.mark.slow
def test_the_llm_verifier_answers_yes_no_from_the_default_model():
    v = trimr.open_llm_verifier(threads=1)
    try:
        a = v.judge("What is 2 + 3?", THOUGHTS[1], None, "")
        b = v.judge("What is 2 + 3?", THOUGHTS[2], a, THOUGHTS[1])
        assert a.calls == 1 and a.ms > 0 and isinstance(a.reaches_answer, bool)
        assert b.calls in (1, 2)
        assert set(v._bias) >= {"answer"}                        # calibrated against a content-free step
    finally:
        v.close()


@pytest.fixture(scope="module")
def system2_short(smollm2_source, tmp_path_factory):
    """SmolLM2 after 10 steps of the System-2 fine-tune (benchmarks/reasoning_train.py, under a minute on 2
    idle cores): enough to learn the reply format (<think>, reflections, the answer line), not the arithmetic."""
    import json
    import subprocess
    import sys

    from conftest import cli_env

    out = tmp_path_factory.mktemp("reasoning") / "system2-10steps"
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "reasoning_train.py"), "--style", "system2",
                        "--steps", "10", "--batch", "4", "--lr", "2e-4", "--warmup", "2", "--problems", "400",
                        "--minutes", "30", "--out", str(out)], capture_output=True, text=True, env=cli_env(), timeout=1900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "edgerun_train.json").read_text())["steps"] == 10
    assert "</think>" in (out / "chat_template.jinja").read_text()
    return out


QUESTION = reasoning.problems("test", 1)[0].question


@pytest.mark.model_dependent
def test_the_system2_model_thinks_and_a_trimmed_reply_ends_with_an_answer_on_torch(system2_short):
    import edgerun

    s = edgerun.load(str(system2_short), backend="torch", temperature=0.0, max_tokens=200, seed=0,
                     trim_thinking=True, progress=False)
    s.trim.max_thoughts = 1                   # close at the first reflection, whatever the verdicts
    try:
        reply = s.chat(QUESTION, stream=False)
    finally:
        s.close()
    assert reply.startswith("<think>")
    t = s.last_turn.thinking
    assert t["closed"] == "underthinking" and t["thoughts"] == 1, (t, reply)
    assert "</think>\nThe answer is" in reply and reasoning.final_answer(reply) is not None, reply
    st = s.last_turn.stats
    # the continuation reused the KV cache: beyond the prompt only the injection (and a token or two the
    # re-tokenized text splits differently) was prefilled
    assert st.prefill_tokens - st.prompt_tokens <= 40, st


@pytest.mark.model_dependent
def test_trim_thinking_on_the_exported_gguf_through_the_cli(system2_short, tmp_path):
    import subprocess

    from conftest import cli_env, edgerun_cmd

    gguf = tmp_path / "system2.Q8_0.gguf"
    r = subprocess.run(edgerun_cmd("export", str(system2_short), "--quant", "Q8_0", "-o", str(gguf), "--no-verify"),
                       capture_output=True, text=True, env=cli_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run(edgerun_cmd("chat", str(gguf), "--trim-thinking", "--temperature", "0", "--max-tokens", "200",
                                   "-p", QUESTION), capture_output=True, text=True, env=cli_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("<think>")
    # the default model's template has no thinking markers: one line naming them
    r = subprocess.run(edgerun_cmd("chat", "--trim-thinking", "-p", "hi"), capture_output=True, text=True,
                       env=cli_env(), timeout=600)
    assert r.returncode == 2 and "<think> ... </think>" in r.stderr and len(r.stderr.strip().splitlines()) == 1
