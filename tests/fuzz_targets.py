"""Fuzz targets: every reader of a user file, its seed files, and the property each must keep.

Shared by the fast test tier (``tests/test_fuzz.py``: a fixed number of examples per reader) and the
longer campaigns of ``benchmarks/fuzz_campaign.py``. Seeds are generated at run time from tiny files
the project itself writes (a GGUF from gguf-py's writer, a safetensors file, a layout, a pattern, a
sweep and a device config from the repository, an ONNX directory ...), so the corpus in the repository
is the code below, not binary files.

The property (``check``): for any bytes written where the reader expects its file, the reader returns
a value or raises one of edgerun's own errors (:class:`edgerun.errors.EdgerunError`) whose message is
one line; never another exception; within ``TIME_BOUND_S`` seconds and ``MEMORY_BOUND`` bytes of
Python allocations (tracemalloc) per input. Where a parsed value is consumed right away by the same
command (an expert pattern's rankings, a layout's bits), the consumer runs too.
"""

from __future__ import annotations

import json
import struct
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from hypothesis import strategies as st

from edgerun.errors import EdgerunError

REPO = Path(__file__).resolve().parents[1]
TIME_BOUND_S = 5.0            # per input, generous for a loaded 2-core machine (typical: < 5 ms)
MEMORY_BOUND = 64 * 2**20     # Python-side peak allocation per input (inputs are at most a few KB)


class PropertyViolation(AssertionError):
    """A reader broke the property: another exception, a multi-line message, or a bound exceeded."""


@dataclass
class Target:
    """One reader.

    Attributes:
        name: short name. filename: where the fuzzed bytes go inside the input directory.
        text: structured (YAML/JSON) input: field-level mutations apply.
        seeds: ``seeds(dir) -> list[bytes]``, made at run time (``dir`` is scratch space).
        setup: ``setup(dir)`` writes companion files the input needs (e.g. an ONNX graph beside genai_config.json).
        read: ``read(path)`` reads (and consumes) the input at ``path``; ``path`` is the file or its directory.
        on_dir: ``read`` takes the directory rather than the file.
    """

    name: str
    filename: str
    seeds: Callable[[Path], list[bytes]]
    read: Callable[[Path], object]
    text: str | None = None           # "yaml" | "json" | None (binary)
    setup: Callable[[Path], None] | None = None
    on_dir: bool = False


# --- seeds ------------------------------------------------------------------------------------------

def _gguf_seeds(d: Path) -> list[bytes]:
    from conftest import write_tiny_gguf

    a = write_tiny_gguf(d / "a.gguf", chat_template="{{ messages }}", n_tensors=2)
    b = write_tiny_gguf(d / "b.gguf", n_tensors=1)
    return [a.read_bytes(), b.read_bytes()]


def _safetensors_seeds(d: Path) -> list[bytes]:
    from safetensors.numpy import save_file

    save_file({"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(3, dtype=np.float16)},
              str(d / "a.safetensors"), metadata={"format": "pt"})
    save_file({"e": np.zeros((0, 2), dtype=np.int8)}, str(d / "b.safetensors"))
    return [(d / "a.safetensors").read_bytes(), (d / "b.safetensors").read_bytes()]


_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
           "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 128}


def _config_seeds(d: Path) -> list[bytes]:
    gemma = {"model_type": "gemma3", "text_config": dict(_CONFIG, head_dim=32)}
    return [json.dumps(_CONFIG).encode(), json.dumps(gemma).encode()]


def _layout_seeds(d: Path) -> list[bytes]:
    from edgerun.kv.layout import Layout

    mixed = Layout([(8, 4), (4, 4), (8, 8)], mode="kivi", group_size=32, window=16, name="mixed", meta={"kl": 0.01})
    return [Layout.uniform("K8V4", 2).to_yaml().encode(), mixed.to_yaml().encode()]


_MERGE = """merge_method: ties
base_model: smollm2-135m-instruct
models:
  - model: ./system2
    parameters: {weight: 1.0}
  - ./other
parameters: {alpha: 1.0, density: 0.2}
tokenizer_source: auto
context_length: 8192
seed: 0
"""
_RECIPE = """passes:
  - merge: {merge_method: ties, models: [./smollm2-math], parameters: {density: 0.2}}
  - carve: {config: S2A2E8, calib_tokens: 16384}
  - finetune: {minutes: 3}
  - prune: {task: code, keep: 2/4}
"""


def _pattern_seeds(d: Path) -> list[bytes]:
    from edgerun.moe import tcess

    stats = [tcess.LayerStats([3.0, 1.0, 0.0, 2.0], [1.5, -0.5, 0.0, 0.2], [0.4, 0.1, 0.0, 0.3],
                              [2.0, 0.5, 0.0, 1.1]) for _ in range(2)]
    p = tcess.Pattern(task="code", tokens=6, model={"layers": 2, "experts": 4, "top_k": 2, "name": "tiny"},
                      score="raw-logit", key_layer=0, stats=stats)
    return [json.dumps(p.to_json(), indent=1).encode()]


def _manifest_seeds(d: Path) -> list[bytes]:
    record = {"source": "smollm2-135m-instruct", "format": "gguf", "quant": "Q8_0", "passes": [{"name": "gguf"}],
              "output": {"sha256": "0" * 64, "bytes": 1234}, "bpw": {"file": 8.6, "linear": 8.5},
              "tools": {"edgerun": "0.1.0", "python": "3.11"}, "created_utc": "2025-01-01T00:00:00Z"}
    return [json.dumps(record, indent=2).encode()]


_GENAI = {"model": {"type": "llama", "context_length": 128, "bos_token_id": 1, "eos_token_id": [2],
                    "decoder": {"filename": "model.onnx", "hidden_size": 8, "num_hidden_layers": 1,
                                "session_options": {}}}}


def _write_onnx_graph(d: Path) -> Path:
    """A one-node graph whose weight lives in external data (model.onnx + model.onnx.data)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(64, dtype=np.float32).reshape(8, 8), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = d / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    return path


def _onnx_setup(d: Path) -> None:
    if not (d / "model.onnx").is_file():
        _write_onnx_graph(d)


def _onnx_config_seeds(d: Path) -> list[bytes]:
    return [json.dumps(_GENAI, indent=1).encode()]


def _onnx_graph_seeds(d: Path) -> list[bytes]:
    return [_write_onnx_graph(d).read_bytes()]


def _onnx_graph_setup(d: Path) -> None:
    (d / "genai_config.json").write_text(json.dumps(_GENAI), encoding="utf-8")
    if not (d / "model.onnx.data").is_file():
        (d / "model.onnx.data").write_bytes(np.arange(64, dtype=np.float32).tobytes())


# --- readers ----------------------------------------------------------------------------------------

def _read_gguf(p: Path):
    from edgerun.formats import gguf

    info = gguf.validate(p)
    return info.chat_template, info.n_params, info.context_length


def _read_safetensors(p: Path):
    from edgerun.formats import safetensors

    return safetensors.validate_file(p)


def _read_checkpoint_config(d: Path):
    from edgerun.kv.layout import model_kv_shape

    return model_kv_shape(d)


def _read_layout(p: Path):
    from edgerun.kv import layout

    lay = layout.load(p)
    return lay.average_bits, lay.describe(), layout.llama_cpp_types(lay), lay.true_bits(64)


def _read_merge_recipe(p: Path):
    from converters import merge

    return merge.load_recipe(p)


def _read_export_recipe(p: Path):
    from converters import passes

    return passes.load(p, src="smollm2-135m-instruct")


def _read_sweep(p: Path):
    from profilers import sweep

    return sweep.load(p).cells()


def _read_device(p: Path):
    from edgerun import device

    return device.budget_bytes(device.load(p))


def _read_pattern(p: Path):
    from edgerun.moe import tcess

    pat = tcess.load(p)
    return pat.keep(1), pat.key().tolist()


def _read_manifest(p: Path):
    from converters import manifest

    return manifest.read(p.parent / "out.gguf")


def _read_onnx_dir(d: Path):
    from edgerun.backends.onnx import validate_model_dir

    return validate_model_dir(d)


def _text(name: str) -> Callable[[Path], list[bytes]]:
    def seeds(d: Path) -> list[bytes]:
        if name == "merge":
            return [_MERGE.encode()]
        if name == "recipe":
            return [_RECIPE.encode(), _MERGE.encode()]
        if name == "sweep":
            return [(REPO / "benchmarks" / "bpw_sweep.yaml").read_bytes()]
        if name == "device":
            return [p.read_bytes() for p in sorted((REPO / "device_configs").glob("*.yaml"))[:2]]
        raise KeyError(name)
    return seeds


TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("gguf", "model.gguf", _gguf_seeds, _read_gguf),
    Target("safetensors", "model.safetensors", _safetensors_seeds, _read_safetensors),
    Target("checkpoint-config", "config.json", _config_seeds, _read_checkpoint_config, text="json", on_dir=True),
    Target("kv-layout", "layout.yaml", _layout_seeds, _read_layout, text="yaml"),
    Target("merge-recipe", "recipe.yaml", _text("merge"), _read_merge_recipe, text="yaml"),
    Target("export-recipe", "recipe.yaml", _text("recipe"), _read_export_recipe, text="yaml"),
    Target("sweep", "sweep.yaml", _text("sweep"), _read_sweep, text="yaml"),
    Target("device", "device.yaml", _text("device"), _read_device, text="yaml"),
    Target("expert-pattern", "code.json", _pattern_seeds, _read_pattern, text="json"),
    Target("manifest", "out.gguf.manifest.json", _manifest_seeds, _read_manifest, text="json"),
    Target("onnx-genai-config", "genai_config.json", _onnx_config_seeds, _read_onnx_dir, text="json",
           setup=_onnx_setup, on_dir=True),
    Target("onnx-graph", "model.onnx", _onnx_graph_seeds, _read_onnx_dir, setup=_onnx_graph_setup, on_dir=True),
]}


# --- mutations --------------------------------------------------------------------------------------

_INTERESTING_U64 = [0, 1, 2, 7, 8, 31, 32, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]
_INTERESTING_TEXT = ["", "0", "-1", "1e999", "nan", "~", "null", "[]", "{}", "&a [*a]", "!!python/object:os.system",
                     "\x00", "a\nb", "'''", "\ufeff", "9" * 40, "[" * 200, "{a: [" * 60]

leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                 st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                 st.sampled_from(_INTERESTING_TEXT), st.sampled_from([2, 4, 8, 16, 32, 0, -1]))
values = st.recursive(leaf, lambda c: st.one_of(st.lists(c, max_size=4),
                                                st.dictionaries(st.one_of(st.text(max_size=6), st.integers(-3, 40)),
                                                                c, max_size=4)), max_leaves=8)


def _paths(obj, prefix=()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, prefix + (i,))
    return out


def _replace(obj, path: tuple, value, delete: bool):
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(obj, dict):
        obj = dict(obj)
        if delete and not rest:
            obj.pop(head, None)
        else:
            obj[head] = _replace(obj[head], rest, value, delete)
    else:
        obj = list(obj)
        if delete and not rest:
            del obj[head]
        else:
            obj[head] = _replace(obj[head], rest, value, delete)
    return obj


@st.composite
def field_mutation(draw, seed: bytes, kind: str) -> bytes:
    """A single-field corruption of a YAML/JSON seed: one value replaced (or deleted, or a key added)."""
    import yaml

    data = yaml.safe_load(seed) if kind == "yaml" else json.loads(seed)
    path = draw(st.sampled_from(_paths(data)))
    op = draw(st.sampled_from(["replace", "delete", "add"]))
    if op == "add":
        target = data
        for k in path:
            target = target[k]
        if isinstance(target, dict):
            data = _replace(data, path, dict(target, **{draw(st.text(max_size=8)): draw(values)}), False)
        else:
            data = _replace(data, path, draw(values), False)
    else:
        data = _replace(data, path, draw(values), op == "delete" and bool(path))
    if kind == "yaml":
        return yaml.safe_dump(data, allow_unicode=draw(st.booleans())).encode("utf-8", "surrogatepass")
    return json.dumps(data, allow_nan=True).encode("utf-8", "surrogatepass")


@st.composite
def byte_mutation(draw, seed: bytes) -> bytes:
    """Truncations, byte flips, 8-byte field overwrites with interesting values, splices of the seed."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "flip", "u64", "u32", "insert", "delete", "dup"]))
        n = len(data)
        if op == "truncate":
            del data[draw(st.integers(0, n)):]
        elif op == "flip" and n:
            i = draw(st.integers(0, n - 1))
            data[i] = draw(st.integers(0, 255))
        elif op in ("u64", "u32") and n >= 8:
            i = draw(st.integers(0, n - 8))
            v = draw(st.sampled_from(_INTERESTING_U64))
            data[i:i + 8 if op == "u64" else i + 4] = (struct.pack("<Q", v) if op == "u64"
                                                       else struct.pack("<I", v & 0xFFFFFFFF))
        elif op == "insert":
            i = draw(st.integers(0, n))
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and n:
            i = draw(st.integers(0, n - 1))
            del data[i:i + draw(st.integers(1, 16))]
        elif op == "dup" and n:
            i = draw(st.integers(0, n - 1))
            data[i:i] = data[i:i + draw(st.integers(1, 64))]
    return bytes(data)


@st.composite
def text_mutation(draw, seed: bytes) -> bytes:
    """Line-level mutations of a text seed: a line dropped, duplicated or replaced by an interesting token."""
    lines = seed.decode("utf-8").splitlines(keepends=True) or [""]
    i = draw(st.integers(0, len(lines) - 1))
    op = draw(st.sampled_from(["drop", "dup", "replace", "append"]))
    if op == "drop":
        del lines[i]
    elif op == "dup":
        lines.insert(i, lines[i])
    elif op == "replace":
        indent = lines[i][:len(lines[i]) - len(lines[i].lstrip())]
        lines[i] = indent + draw(st.sampled_from(_INTERESTING_TEXT + ["a: *b", "x: &b [1, *b]"])) + "\n"
    else:
        lines.append(draw(st.sampled_from(["<<: *a\n", "%YAML 9.9\n", "--- \n- 1\n", "? [a, b]\n: c\n"])))
    return "".join(lines).encode("utf-8", "surrogatepass")


def inputs(target: Target, seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    """Every way of making an input for ``target``: raw seeds, mutations of them, random bytes."""
    parts = [st.sampled_from(seeds), st.sampled_from(seeds).flatmap(byte_mutation), st.binary(max_size=256)]
    if target.text:
        parts.append(st.sampled_from(seeds).flatmap(lambda s: field_mutation(s, target.text)))
        parts.append(st.sampled_from(seeds).flatmap(text_mutation))
    return st.one_of(*parts)


# --- the property -----------------------------------------------------------------------------------

_warmed: set[str] = set()


def check(target: Target, directory: Path, data: bytes) -> str:
    """Write ``data`` as the target's input in ``directory`` and read it; return the outcome.

    Returns:
        ``"ok"`` (a value) or ``"error"`` (edgerun's one-line error).

    Raises:
        PropertyViolation: any other exception, a message of more than one line, or a bound exceeded.
    """
    if target.setup:
        target.setup(directory)
    path = directory / target.filename
    if target.name not in _warmed:          # imports (torch, onnx, ...) are not the reader's cost
        _warmed.add(target.name)
        path.write_bytes(target.seeds(directory)[0])
        target.read(directory if target.on_dir else path)
    path.write_bytes(data)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        target.read(directory if target.on_dir else path)
        outcome = "ok"
    except EdgerunError as e:
        msg = str(e)
        if len(msg.splitlines()) != 1 or not msg.strip():
            raise PropertyViolation(f"{target.name}: {type(e).__name__} message is not one line: {msg!r}") from e
        outcome = "error"
    except Exception as e:  # noqa: BLE001 - the property under test
        raise PropertyViolation(f"{target.name}: {type(e).__name__}: {e}"[:500]) from e
    finally:
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    if elapsed > TIME_BOUND_S:
        raise PropertyViolation(f"{target.name}: {elapsed:.1f} s on a {len(data)}-byte input (bound {TIME_BOUND_S} s)")
    if peak > MEMORY_BOUND:
        raise PropertyViolation(f"{target.name}: {peak / 2**20:.0f} MiB allocated on a {len(data)}-byte input")
    return outcome
