"""Fuzzing of every reader of user files (hypothesis): a value or edgerun's one-line error, nothing else.

The readers, their seeds (tiny files generated here) and the property are in ``tests/fuzz_targets.py``;
this tier runs a fixed, derandomized number of examples per reader (the whole module in well under a
minute). Longer campaigns with coverage: ``python benchmarks/fuzz_campaign.py``.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

import fuzz_targets as ft

EXAMPLES = 150          # per reader; derandomized, so CI runs the same inputs every time


@pytest.mark.parametrize("name", sorted(ft.TARGETS))
def test_reader_gives_value_or_one_line_error(name, tmp_path_factory):
    target = ft.TARGETS[name]
    seeds = target.seeds(tmp_path_factory.mktemp(f"seed-{name}"))
    work = tmp_path_factory.mktemp(f"fuzz-{name}")
    for seed in seeds:                       # the seeds themselves are valid files: they must parse
        assert ft.check(target, work, seed) == "ok", f"seed of {name} does not parse"

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(ft.inputs(target, seeds))
    def run(data):
        ft.check(target, work, data)

    run()


# --- the crashes the fuzzing found, kept as plain regression tests -------------------------------------

def _raises_one_line(fn, *args, exc=None):
    from edgerun.errors import EdgerunError

    with pytest.raises(exc or EdgerunError) as info:
        fn(*args)
    assert len(str(info.value).splitlines()) == 1
    return str(info.value)


@pytest.mark.parametrize("text, says", [
    ("layers: &a [*a]\n", "recursive alias"),                                  # a list inside itself
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
     "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n",
     "aliases are expanded"),                                                  # "billion laughs"
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    ("layers: 1\npairs: {0: {nbits_key: 8, nbits_value: 8}}\n1: x\nb: y\n", "unknown field '1'"),  # mixed keys
    ('layers: 1\npairs: {0: {nbits_key: 8, nbits_value: 8}}\n"a\\nb": 1\n', "unknown field 'a\\nb'"),
])
def test_yaml_found_crashes(tmp_path, text, says):
    from edgerun.kv import layout

    p = tmp_path / "layout.yaml"
    p.write_text(text)
    assert says in _raises_one_line(layout.load, p)


def test_pattern_with_non_numeric_statistics(tmp_path):
    import json

    from edgerun.errors import ModelFileError
    from edgerun.moe import tcess

    d = json.loads(ft._pattern_seeds(tmp_path)[0])
    d["stats"][1]["count"][2] = None
    (tmp_path / "code.json").write_text(json.dumps(d))
    assert "equal-length lists of numbers" in _raises_one_line(tcess.load, tmp_path / "code.json", exc=ModelFileError)


def test_manifest_garbage(tmp_path):
    from converters import manifest
    from edgerun.errors import ModelFileError

    (tmp_path / "x.gguf.manifest.json").write_bytes(b"\x80not json")
    _raises_one_line(manifest.read, tmp_path / "x.gguf", exc=ModelFileError)
    (tmp_path / "x.gguf.manifest.json").write_text("[1]")
    _raises_one_line(manifest.read, tmp_path / "x.gguf", exc=ModelFileError)


@pytest.mark.parametrize("entry", [{"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]},
                                   {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]},
                                   {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}])
def test_safetensors_header_types(tmp_path, entry):
    import json
    import struct

    from edgerun.errors import ModelFileError
    from edgerun.formats import safetensors

    raw = json.dumps({"w": entry}).encode()
    (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    _raises_one_line(safetensors.validate_file, tmp_path / "m.safetensors", exc=ModelFileError)


@pytest.mark.parametrize("change", [{"num_attention_heads": 0}, {"num_hidden_layers": -1}, {"hidden_size": "x"}])
def test_checkpoint_config_kv_shape(tmp_path, change):
    import json

    from edgerun.errors import ModelFileError
    from edgerun.kv.layout import model_kv_shape

    (tmp_path / "config.json").write_text(json.dumps({**ft._CONFIG, **change, "num_key_value_heads": None}))
    _raises_one_line(model_kv_shape, tmp_path, exc=ModelFileError)


def test_onnx_external_data_bad_offset(tmp_path):
    import onnx

    from edgerun.backends.onnx import validate_model_dir
    from edgerun.errors import ModelFileError

    ft._onnx_setup(tmp_path)
    (tmp_path / "genai_config.json").write_text(__import__("json").dumps(ft._GENAI))
    model = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    for e in model.graph.initializer[0].external_data:
        if e.key == "offset":
            e.value = "abc"
            break
    else:
        model.graph.initializer[0].external_data.add(key="offset", value="abc")
    onnx.save_model(model, str(tmp_path / "model.onnx"))
    _raises_one_line(validate_model_dir, tmp_path, exc=ModelFileError)
