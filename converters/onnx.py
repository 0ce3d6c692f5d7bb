"""HF checkpoint -> ONNX decoder with KV cache, for onnxruntime-genai.

- fp32 and int4 graphs come from onnxruntime-genai's model builder
  (``python -m onnxruntime_genai.models.builder -i HF_DIR -o OUT -p fp32|int4 -e cpu``), which fuses
  QKV, writes MatMulNBits int4 weights (block size 32/64/128, symmetric, round to nearest) and the
  ``genai_config.json`` and tokenizer files the runtime needs. It runs in a subprocess: its log goes
  to ``builder.log`` in the output, not to the user's terminal.
- int8 weights: onnxruntime's ``quantize_dynamic`` (QInt8 weights, dynamically quantized per-tensor
  activations) applied to the fp32 graph (``--onnx-algo dynamic``, the default), or the builder's
  weight-only MatMulNBits int8 (``--onnx-algo builder``). On SmolLM2 the dynamic activation
  quantization loses a lot (its activations have outliers two orders of magnitude above the rest);
  the weight-only variant does not quantize activations.
- Other int4 algorithms on the fp32 graph with onnxruntime's ``MatMulNBitsQuantizer``: ``rtn``,
  ``hqq`` (Badri & Shaji 2023, half-quadratic, no calibration data) and ``gptq`` (Frantar et al. 2023,
  calibrated on the wiki calibration split), for when the builder's default is not what was asked.

Every output directory is written atomically.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization import matmul_nbits_quantizer as mnq
from onnxruntime.quantization.quant_utils import QuantFormat

from edgerun import data
from edgerun.atomic import atomic_dir
from edgerun.errors import BackendError, UsageError
from edgerun.formats import safetensors as st_format

PRECISIONS = ("fp32", "int8", "int4")
INT4_ALGOS = ("builder", "rtn", "hqq", "gptq")
INT8_ALGOS = ("dynamic", "builder")
BLOCK_SIZES = (32, 64, 128)
_RUNTIME_FILES = ("genai_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                  "special_tokens_map.json", "generation_config.json")


def check_options(precision: str, block_size: int, algo: str) -> tuple[str, int, str]:
    """Validate ONNX export options.

    Raises:
        UsageError: unknown precision, block size or algorithm (the message lists the valid ones).
    """
    p = precision.lower()
    if p not in PRECISIONS:
        raise UsageError(f"unknown ONNX precision '{precision}'; valid: {', '.join(PRECISIONS)}")
    if block_size not in BLOCK_SIZES:
        raise UsageError(f"unsupported int4 block size {block_size}; valid: {', '.join(map(str, BLOCK_SIZES))}")
    a = algo.lower()
    if p == "int8":
        a = "dynamic" if a in ("default", "") else a
        if a not in INT8_ALGOS:
            raise UsageError(f"unknown int8 algorithm '{algo}'; valid: {', '.join(INT8_ALGOS)}")
    elif p == "int4":
        a = "builder" if a in ("default", "") else a
        if a not in INT4_ALGOS:
            raise UsageError(f"unknown int4 algorithm '{algo}'; valid: {', '.join(INT4_ALGOS)}")
    elif a not in ("default", "builder", ""):
        raise UsageError(f"--onnx-algo applies to int4 and int8, not {p}")
    else:
        a = "builder"
    return p, block_size, a


def run_builder(checkpoint: Path, out: Path, precision: str, block_size: int = 32) -> None:
    """Run onnxruntime-genai's model builder in a subprocess; its log is kept in ``out/builder.log``.

    Raises:
        BackendError: the builder fails (the last line of its log is in the message).
    """
    cache = out / ".builder-cache"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(cache)]
    if precision in ("int4", "int8"):
        cmd += ["--extra_options", f"block_size={block_size}"]
    out.mkdir(parents=True, exist_ok=True)
    log = out / "builder.log"
    with open(log, "w", encoding="utf-8") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    shutil.rmtree(cache, ignore_errors=True)
    if rc != 0:
        lines = [ln for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
        raise BackendError(f"onnxruntime-genai's builder failed on {checkpoint}: {lines[-1] if lines else rc}")


def write_onnx(checkpoint: str | Path, out: str | Path, precision: str = "int4", block_size: int = 32,
               algo: str = "default", force: bool = False) -> Path:
    """Export an HF checkpoint to an onnxruntime-genai model directory, atomically.

    Args:
        checkpoint: HF checkpoint directory.
        out: output directory.
        precision: ``fp32``, ``int8`` (quantize_dynamic) or ``int4`` (MatMulNBits).
        block_size: int4 block size (32, 64 or 128).
        algo: int4: ``builder`` (the builder's RTN, default), ``rtn``, ``hqq`` or ``gptq``;
            int8: ``dynamic`` (quantize_dynamic, default) or ``builder`` (weight-only MatMulNBits).
        force: replace an existing output directory.

    Raises:
        UsageError: bad options, output exists without ``force``.
        ModelFileError: invalid checkpoint.
        BackendError: the builder or a quantizer fails.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    precision, block_size, algo = check_options(precision, block_size, algo)
    st_format.checkpoint_files(checkpoint)
    model_type = st_format.read_config(checkpoint).get("model_type")
    if model_type in ("gemma3", "gemma3_text"):
        # onnxruntime-genai 0.18's Gemma 3 path reads the flat RoPE config of transformers 4; transformers 5
        # keeps it per attention type. Adapting the config makes the builder run, but its fp32 graph then
        # scores perplexity 20.3 where the model scores 9.27 (measured): refuse rather than write that.
        raise UsageError("ONNX export of Gemma 3 is not supported yet (onnxruntime-genai 0.18's builder does not "
                         "read transformers 5's Gemma 3 config correctly); export it to GGUF instead (--to gguf)")
    # the carved MoE's host architecture is not one the builder knows: its graph comes from torch.onnx.export
    own_graph = model_type == "granitemoeshared"
    if own_graph and algo == "builder" and precision != "fp32":
        algo = "rtn"
    with atomic_dir(out, force=force) as tmp:
        if algo == "builder":  # fp32, or MatMulNBits int4/int8 weights written by the builder itself
            if own_graph:
                _export_own_graph(checkpoint, tmp)
            else:
                run_builder(checkpoint, tmp, precision, block_size)
        else:
            fp32 = tmp / ".fp32"
            if own_graph:
                _export_own_graph(checkpoint, fp32)
            else:
                run_builder(checkpoint, fp32, "fp32")
            for name in _RUNTIME_FILES:
                if (fp32 / name).exists():
                    shutil.copy2(fp32 / name, tmp / name)
            if precision == "int8":
                _quantize_int8(fp32 / "model.onnx", tmp / "model.onnx")
            else:
                _quantize_int4(fp32 / "model.onnx", tmp / "model.onnx", block_size, algo, checkpoint)
            if (fp32 / "builder.log").is_file():
                shutil.copy2(fp32 / "builder.log", tmp / "builder.log")
            shutil.rmtree(fp32)
    return out


def _export_own_graph(checkpoint: Path, directory: Path) -> None:
    """fp32 graph of a granitemoeshared checkpoint via torch.onnx.export; its log goes to ``export.log``."""
    from converters.onnx_decoder import export  # heavy: torch, only for a carved MoE's own graph (the builder needs none)

    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), warnings.catch_warnings(), \
            _quiet_logging():
        warnings.simplefilter("ignore")
        export(checkpoint, directory, force=True)
    (directory / "export.log").write_text(log.getvalue(), encoding="utf-8")


@contextlib.contextmanager
def _quiet_logging():
    """onnxruntime's quantizers log per node at INFO/WARNING on the root logger: keep that off the terminal."""
    root = logging.getLogger()
    saved = [(lg, lg.level) for lg in (root, logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer"))]
    for lg, _ in saved:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def _quantize_int8(src: Path, dst: Path) -> None:
    with _quiet_logging():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, use_external_data_format=True,
                         extra_options={"MatMulConstBOnly": True})
    _name_external_data(dst)


def _quantize_int4(src: Path, dst: Path, block_size: int, algo: str, checkpoint: Path) -> None:
    if algo == "hqq":
        config = mnq.HQQWeightOnlyQuantConfig(block_size=block_size, bits=4)
    elif algo == "rtn":
        config = mnq.RTNWeightOnlyQuantConfig(quant_format=QuantFormat.QOperator)
    else:
        config = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=_CalibrationReader(src, checkpoint),
                                               block_size=block_size, quant_format=QuantFormat.QOperator)
    model = onnx.load(str(src))
    quantizer = mnq.MatMulNBitsQuantizer(model, block_size=block_size, is_symmetric=True, algo_config=config)
    with _quiet_logging():
        quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=True)
    _name_external_data(dst)


def _name_external_data(model_path: Path) -> None:
    """onnxruntime-genai expects the weights in ``<model>.data``; rewrite whatever name a tool chose."""
    model = onnx.load(str(model_path), load_external_data=True)
    for f in model_path.parent.glob("*.data"):
        f.unlink()
    for f in model_path.parent.glob("*.onnx_data"):
        f.unlink()
    onnx.save_model(model, str(model_path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=model_path.name + ".data", size_threshold=1024)


class _CalibrationReader:
    """GPTQ calibration inputs for the builder's decoder: wiki calibration windows, empty KV cache.

    ``n_samples`` windows of ``length`` tokens by :func:`edgerun.data.token_windows` (BOS first when
    the model's tokenizer adds one), each fed as int64 (1, T) ids with its mask and positions.
    """

    def __init__(self, model_path: Path, checkpoint: Path, n_samples: int = 8, length: int = 256):
        from transformers import AutoTokenizer  # heavy: transformers (+ torch), only for GPTQ calibration

        tok = AutoTokenizer.from_pretrained(checkpoint)
        cfg = json.loads((model_path.parent / "genai_config.json").read_text())["model"]["decoder"]
        kv, hd, layers = cfg["num_key_value_heads"], cfg["head_size"], cfg["num_hidden_layers"]
        with_positions = "position_ids" in cfg.get("inputs", {})
        self.samples = []
        for ids in data.token_windows(tok, "wiki", "calibration", length, n_samples):
            window = np.array([ids], dtype=np.int64)
            feed = {"input_ids": window, "attention_mask": np.ones_like(window)}
            if with_positions:
                feed["position_ids"] = np.arange(window.shape[1], dtype=np.int64)[None]
            for layer in range(layers):
                for kind in ("key", "value"):
                    feed[f"past_key_values.{layer}.{kind}"] = np.zeros((1, kv, 0, hd), dtype=np.float32)
            self.samples.append(feed)
        self._it = iter(self.samples)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self.samples)
