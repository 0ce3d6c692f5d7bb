"""The main job on the real default model (SmolLM2-135M-Instruct Q4_1), greedy decoding."""

from __future__ import annotations

import pytest

from edgerun.backends.base import SamplingParams
from edgerun.errors import UsageError


@pytest.mark.model_dependent
def test_factual_question_is_answered(greedy_session):
    reply = "".join(greedy_session.chat("What is the capital of Germany?"))
    assert "Berlin" in reply


def test_streaming_and_non_streaming_give_the_same_text(greedy_session):
    question = "Name three primary colors."
    streamed = "".join(greedy_session.chat(question, stream=True))
    greedy_session.clear()
    whole = greedy_session.chat(question, stream=False)
    assert isinstance(whole, str) and whole.strip()
    assert streamed == whole


def test_stats_report_ttft_and_speeds(greedy_session):
    "".join(greedy_session.chat("Say hello."))
    s = greedy_session.stats
    assert s.ttft_ms > 0
    assert 0 < s.prefill_tokens <= s.prompt_tokens  # a shared prefix may come from the KV cache
    assert s.generated_tokens >= 1
    assert s.decode_tokens_per_s and s.decode_tokens_per_s > 0
    assert s.prefill_tokens_per_s and s.prefill_tokens_per_s > 0
    assert s.context_used == s.prompt_tokens + s.generated_tokens - (1 if s.finish_reason == "length" else 0)


def test_second_turn_reuses_the_first_turn_from_the_kv_cache(greedy_session):
    "".join(greedy_session.chat("What is 2 + 2?"))
    first = greedy_session.stats
    "".join(greedy_session.chat("And 3 + 3?"))
    second = greedy_session.stats
    assert second.prompt_tokens > first.prompt_tokens
    assert second.prefill_tokens < second.prompt_tokens - first.prompt_tokens + 10


def test_history_reaches_the_prompt(greedy_session):
    first_reply = "".join(greedy_session.chat("My favourite fruit is the mango."))
    "".join(greedy_session.chat("Which fruit did I mention?"))
    prompt = greedy_session.last_prompt
    assert "My favourite fruit is the mango." in prompt
    assert first_reply.strip()[:20] in prompt
    assert prompt.index("mango.") < prompt.index("Which fruit did I mention?")


@pytest.mark.model_dependent
def test_model_recalls_a_stated_name(greedy_session):
    # model-dependent (SmolLM2-135M at temperature 0), kept apart from the prompt-level check above
    reply_without_history = greedy_session.chat("What's my name?", stream=False)
    greedy_session.clear()
    "".join(greedy_session.chat("Hello, I am Alice."))
    reply = "".join(greedy_session.chat("What's my name?"))
    assert "Alice" not in reply_without_history
    assert "Alice" in reply


def test_clear_forgets_the_conversation(greedy_session):
    "".join(greedy_session.chat("Remember the word zeppelin."))
    greedy_session.clear()
    assert greedy_session.messages == []
    "".join(greedy_session.chat("Hello."))
    assert "zeppelin" not in greedy_session.last_prompt


def test_empty_message_is_refused(greedy_session):
    with pytest.raises(UsageError, match="empty"):
        greedy_session.chat("   ")


@pytest.mark.model_dependent
def test_interrupted_reply_keeps_history_and_the_next_turn_works(greedy_session):
    pieces = greedy_session.chat("Write a long story about a dragon.")
    shown = [next(pieces) for _ in range(3)]
    pieces.close()  # what Ctrl-C does in the REPL
    assert greedy_session.stats.finish_reason == "interrupted"
    assert greedy_session.messages[-1] == {"role": "assistant", "content": "".join(shown)}
    reply = "".join(greedy_session.chat("What is the capital of Germany?"))
    assert "Berlin" in reply


def test_small_context_overflow_drops_oldest_turns_and_keeps_the_system_prompt(default_model_path):
    import edgerun

    notices = []
    session = edgerun.load(default_model_path, n_ctx=256, system="You are terse.", temperature=0.0,
                           max_tokens=40, notify=notices.append, progress=False)
    try:
        for i in range(8):
            reply = "".join(session.chat(f"Question {i}: tell me one fact about the number {i}."))
            assert session.stats.context_used <= 256
            assert isinstance(reply, str)
        assert session.messages[0] == {"role": "system", "content": "You are terse."}
        assert "Question 0" not in session.last_prompt  # the oldest turns were dropped
        assert "Question 7" in session.last_prompt
        assert len([n for n in notices if "dropping the oldest turns" in n]) == 1  # told once
    finally:
        session.backend.close()


def test_message_longer_than_the_context_is_cut_not_crashed(default_model_path):
    import edgerun

    notices = []
    session = edgerun.load(default_model_path, n_ctx=128, temperature=0.0, max_tokens=16,
                           notify=notices.append, progress=False)
    try:
        reply = "".join(session.chat("word " * 500 + "What is the capital of Germany?"))
        assert isinstance(reply, str)
        assert any("message too long" in n for n in notices)
        assert session.stats.context_used <= 128
    finally:
        session.backend.close()


@pytest.mark.model_dependent
def test_logits_match_between_full_sequence_and_prefix(llama_backend):
    tokens = llama_backend.encode_prompt("The capital of France is")
    full = llama_backend.logits(tokens)
    assert full.shape == (len(tokens), 49152)
    prefix = llama_backend.logits(tokens[:3])
    assert abs(full[:3] - prefix).max() < 1e-3
    paris = llama_backend.tokenize(" Paris")[0]
    assert full[-1].argmax() == paris


def test_memory_reports_weights_and_kv_cache(llama_backend):
    m = llama_backend.memory()
    assert 80e6 < m.model_bytes < 110e6
    # SmolLM2: 30 layers x 3 KV heads x 64 dims x (K + V) x 2 bytes (f16) per token
    assert m.kv_cache_bytes == 30 * 3 * 64 * 2 * 2 * llama_backend.n_ctx
    assert m.rss_bytes > m.model_bytes / 2


def test_sampling_with_a_seed_is_reproducible(llama_backend):
    tokens = llama_backend.encode_prompt("<|im_start|>user\nTell me a joke.<|im_end|>\n<|im_start|>assistant\n")
    params = SamplingParams(temperature=0.9, max_tokens=20, seed=1234)
    a = llama_backend.complete(tokens, params)
    b = llama_backend.complete(tokens, params)
    assert a == b
