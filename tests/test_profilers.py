"""Profilers: RAPL energy on fake powercap trees, latency and memory on real generations, device configs."""

from __future__ import annotations

import pathlib

import pytest

from profilers import power


def _zone(root: pathlib.Path, name: str, dirname: str, energy: int, max_range: int = 262_143_328_850) -> pathlib.Path:
    d = root / dirname
    d.mkdir(parents=True)
    (d / "name").write_text(name + "\n")
    (d / "energy_uj").write_text(f"{energy}\n")
    (d / "max_energy_range_uj").write_text(f"{max_range}\n")
    return d


def _set(d: pathlib.Path, energy: int) -> None:
    (d / "energy_uj").write_text(f"{energy}\n")


def test_intel_tree_energy_by_domain(tmp_path):
    pkg = _zone(tmp_path, "package-0", "intel-rapl:0", 1_000_000)
    core = _zone(tmp_path, "core", "intel-rapl:0:0", 500_000)
    dram = _zone(tmp_path, "dram", "intel-rapl:0:1", 10)
    meter = power.EnergyMeter(tmp_path, sample_s=60)
    with meter:
        _set(pkg, 3_500_000)   # +2.5 J
        _set(core, 1_500_000)  # +1.0 J
        _set(dram, 250_010)    # +0.25 J
    r = meter.reading
    assert r.available and r.wraps == 0
    assert r.joules == pytest.approx({"package": 2.5, "core": 1.0, "dram": 0.25})
    assert r.watts["package"] == pytest.approx(2.5 / r.seconds)


UNIT_UJ = 61  # one energy unit of a typical Intel package (2^-14 J = 61.04 uJ), rounded as energy_uj is


def test_counter_wraparound_is_corrected_within_one_energy_unit(tmp_path):
    # The hardware counter counts units; energy_uj = units x 61 and wraps from max to 0 by one unit.
    max_units = 16_383
    pkg = _zone(tmp_path, "package-0", "intel-rapl:0", 16_380 * UNIT_UJ, max_range=max_units * UNIT_UJ)
    meter = power.EnergyMeter(tmp_path, sample_s=60)
    with meter:
        _set(pkg, 10 * UNIT_UJ)  # 3 units to the top, one unit to 0, then 10 units
    true_uj = (3 + 1 + 10) * UNIT_UJ
    assert meter.reading.wraps == 1
    assert meter.reading.joules["package"] == pytest.approx((true_uj - UNIT_UJ) / 1e6)  # + max alone: one unit short
    assert abs(meter.reading.joules["package"] * 1e6 - true_uj) <= UNIT_UJ


def test_several_wraps_are_each_within_one_energy_unit(tmp_path):
    max_units = 1_000
    pkg = _zone(tmp_path, "package-0", "intel-rapl:0", 0, max_range=max_units * UNIT_UJ)
    meter = power.EnergyMeter(tmp_path, sample_s=60)
    units, true_units = 0, 0
    with meter:
        for step in (700, 700, 700, 700):  # a sampler read after each: two wraps (past 1,000 units twice)
            units, true_units = (units + step) % (max_units + 1), true_units + step
            _set(pkg, units * UNIT_UJ)
            meter._sample()
    r = meter.reading
    assert r.wraps == 2 and r.available
    assert 0 <= true_units * UNIT_UJ - r.joules["package"] * 1e6 <= r.wraps * UNIT_UJ


def test_zone_without_max_range_is_kept_with_a_note(tmp_path):
    pkg = _zone(tmp_path, "package-0", "intel-rapl:0", 1_000_000)
    dram = _zone(tmp_path, "dram", "intel-rapl:0:1", 0)
    (dram / "max_energy_range_uj").unlink()
    zones, reason = power.discover(tmp_path)
    assert reason == ""
    by_name = {z.name: z for z in zones}
    assert set(by_name) == {"package-0", "dram"}
    assert by_name["dram"].max_range_uj is None and "cannot correct wraparound" in by_name["dram"].note
    assert by_name["package-0"].note == ""
    meter = power.EnergyMeter(tmp_path, sample_s=60)
    with meter:
        _set(pkg, 2_000_000)
        _set(dram, 500_000)
    r = meter.reading.as_dict()
    assert r["energy_joules"] == pytest.approx({"package": 1.0, "dram": 0.5})
    assert "cannot correct wraparound" in r["energy_notes"]["intel-rapl:0:1"]
    assert "energy_unavailable" not in r


def test_only_zone_without_max_range_is_not_no_rapl_zones(tmp_path):
    pkg = _zone(tmp_path, "package-0", "intel-rapl:0", 5)
    (pkg / "max_energy_range_uj").write_text("garbage\n")
    zones, reason = power.discover(tmp_path)
    assert reason == "" and [z.name for z in zones] == ["package-0"]
    assert "cannot correct wraparound" in zones[0].note


def test_backward_step_without_max_range_is_unavailable_not_negative(tmp_path):
    pkg = _zone(tmp_path, "package-0", "intel-rapl:0", 9_000_000)
    core = _zone(tmp_path, "core", "intel-rapl:0:0", 100)
    (pkg / "max_energy_range_uj").unlink()
    meter = power.EnergyMeter(tmp_path, sample_s=60)
    with meter:
        _set(pkg, 1_000)  # went backwards: a wrap of unknown size
        _set(core, 1_000_100)
    r = meter.reading
    assert r.available and r.wraps == 0
    assert "package" not in r.joules and "package" not in r.watts
    assert r.joules == pytest.approx({"core": 1.0})
    assert all(j >= 0 for j in r.joules.values())
    assert "cannot correct wraparound" in r.unavailable["package"]
    assert "went backwards" in r.unavailable["package"]
    d = r.as_dict()
    assert d["energy_unavailable"]["package"].startswith("unavailable (")
    idle = power.EnergyReading(available=True, seconds=1.0, joules={"package": 2.0}, watts={"package": 2.0})
    assert "package_joules_above_idle" not in power.above_idle(r, idle)  # never 0 - idle, i.e. negative


def test_power_polling_interval_derived_from_range_and_tdp(tmp_path):
    z = lambda r: power.Zone(tmp_path, "package-0", "package", r)  # noqa: E731
    # 2^32 uJ at 28 W wraps in 153.4 s; a quarter is 38.3 s, capped at 1 s
    assert 2**32 / 28e6 == pytest.approx(153.39, abs=0.01)
    assert power.polling_interval_s([z(2**32)], 28) == 1.0
    # 20 J at 28 W wraps in 0.714 s: poll every 0.179 s; the fastest-wrapping zone decides
    assert power.polling_interval_s([z(2**32), z(20_000_000)], 28) == pytest.approx(0.25 * 20 / 28)
    # default TDP 150 W when the device config has none
    assert power.polling_interval_s([z(60_000_000)]) == pytest.approx(0.25 * 60 / 150)
    # a tiny range gives the floor
    assert power.polling_interval_s([z(1_000)], 28) == power.POLL_MIN_S == 0.01
    # zones without a range do not constrain it
    assert power.polling_interval_s([z(None)], 28) == power.POLL_MAX_S
    with pytest.raises(ValueError):
        power.polling_interval_s([z(2**32)], 0)


def test_energy_meter_uses_the_derived_interval_unless_given(tmp_path):
    _zone(tmp_path, "package-0", "intel-rapl:0", 0, max_range=20_000_000)
    assert power.EnergyMeter(tmp_path, tdp_watts=28).sample_s == pytest.approx(0.25 * 20 / 28)
    assert power.EnergyMeter(tmp_path, sample_s=60, tdp_watts=28).sample_s == 60


def test_amd_tree_has_package_and_core_only(tmp_path):
    pkg = _zone(tmp_path, "package-0", "intel-rapl:0", 0)
    core = _zone(tmp_path, "core", "intel-rapl:0:0", 0)
    meter = power.EnergyMeter(tmp_path, sample_s=60)
    with meter:
        _set(pkg, 4_000_000)
        _set(core, 3_000_000)
    assert set(meter.reading.joules) == {"package", "core"}
    assert power.discover(tmp_path)[1] == ""


def test_permission_denied_is_reported_not_zero(tmp_path, monkeypatch):
    _zone(tmp_path, "package-0", "intel-rapl:0", 123)
    real = pathlib.Path.read_text

    def deny(self, *a, **k):  # what a patched kernel does for non-root readers of energy_uj
        if self.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "read_text", deny)
    meter = power.EnergyMeter(tmp_path)
    with meter:
        pass
    assert not meter.reading.available
    assert "permission denied" in meter.reading.reason
    assert meter.reading.as_dict() == {"energy": f"unavailable ({meter.reading.reason})"}


def test_no_powercap_tree_means_unavailable(tmp_path):
    meter = power.EnergyMeter(tmp_path / "missing")
    with meter:
        pass
    assert meter.reading.as_dict()["energy"].startswith("unavailable (no ")


def test_tdp_estimate_is_a_separate_labelled_field():
    est = power.estimate_from_tdp(tdp_watts=28, idle_watts=3, cpu_utilization=0.5, seconds=2.0)
    assert est["estimated_energy_joules_from_tdp"] == pytest.approx((3 + 0.5 * 25) * 2.0)
    assert "not a measurement" in est["estimate_basis"]
    assert "energy_joules" not in est


# --- latency and memory on the real model ---------------------------------------------------------

def test_latency_on_a_real_generation(llama_backend):
    from profilers import latency

    prompt = llama_backend.tokenize("The history of the printing press begins")
    rec = latency.measure(llama_backend, prompt, max_tokens=24)
    assert rec.ttft_ms > 0 and rec.total_ms > rec.ttft_ms
    assert rec.generated_tokens == 24  # fixed length: end-of-generation tokens are not honoured
    assert abs(len(llama_backend.tokenize(rec.text)) - rec.generated_tokens) <= 2
    assert rec.decode_tokens_per_s > 0 and rec.engine_decode_tokens_per_s > 0
    assert rec.itl_p50_ms <= rec.itl_p95_ms


def test_peak_rss_rises_with_a_larger_model(exported, smollm2_f32_gguf):
    import gc

    from edgerun.backends.llamacpp import LlamaCppBackend
    from profilers import latency
    from edgerun.procmem import PeakRSS

    def delta(path):
        gc.collect()
        with PeakRSS() as rss:
            b = LlamaCppBackend(path, n_ctx=256)
            latency.measure(b, b.tokenize("Hello there, how are you today?"), max_tokens=4)
            b.close()
        return rss.peak_bytes - rss.start_bytes

    small, large = delta(exported("Q4_K_M").output), delta(smollm2_f32_gguf)
    assert large > small + 200 * 2**20  # the F32 file is ~5x the Q4_K_M one (515 vs 100 MiB)


def test_context_reuse_scoring_matches_full_evaluation(llama_backend):
    from edgerun.backends.base import Backend

    ctx = llama_backend.tokenize("Question: Which is a mammal?\nAnswer:")
    conts = [llama_backend.tokenize(" a dolphin"), llama_backend.tokenize(" a shark swimming fast")]
    fast = llama_backend.continuation_logprobs(ctx, conts)
    slow = Backend.continuation_logprobs(llama_backend, ctx, conts)  # the generic path, one full pass each
    for a, b in zip(fast, slow):
        assert a.shape == b.shape and abs(a - b).max() < 1e-3


@pytest.mark.model_dependent
def test_arc_easy_accuracy_beats_chance_with_an_interval(exported):
    from edgerun.backends.llamacpp import LlamaCppBackend
    from profilers.accuracy import task_accuracy

    b = LlamaCppBackend(exported("Q8_0").output, n_ctx=512)
    try:
        r = task_accuracy(b, "smollm2 Q8_0", "arc-easy", n=40)
    finally:
        b.close()
    assert r.n == 40 and r.chance == pytest.approx(0.25, abs=0.01)
    assert r.ci95[0] <= r.accuracy <= r.ci95[1]
    assert r.accuracy_norm > 0.35  # SmolLM2-135M is well above the 25% of guessing on ARC-Easy


def test_wilson_interval_known_values():
    from profilers.accuracy import wilson_interval

    lo, hi = wilson_interval(50, 100)
    assert (round(lo, 3), round(hi, 3)) == (0.404, 0.596)
    assert wilson_interval(0, 10)[0] == 0.0


# --- device configs -------------------------------------------------------------------------------

def test_shipped_device_configs_load():
    from edgerun import device

    root = pathlib.Path(__file__).resolve().parent.parent / "device_configs"
    names = {device.load(p).name for p in root.glob("*.yaml")}
    assert {"framework13-ryzen7-7840u", "intel-i7-1365u-ultrabook"} <= names


@pytest.mark.parametrize("text, message", [
    ("name: x\ncpu_model: y\ncores: [\n", "malformed YAML at line"),
    ("name: x\ncpu_model: y\ncores: -2\nthreads: 4\nram_gib: 8\nmemory_budget_gib: 4\n", "line 3: field 'cores' must be a positive integer"),
    ("name: x\ncpu_model: y\ncores: 2\nthreads: 4\nram_gib: 8\nmemory_budget_gib: 16\n", "line 6: field 'memory_budget_gib' (16) exceeds ram_gib"),
    ("name: x\ncpu_model: y\ncores: 2\nthreads: 4\nram_gib: 8\nmemory_budget_gib: 4\nturbo: yes\n", "line 7: unknown field 'turbo'"),
    ("name: x\ncores: 2\n", "missing field 'cpu_model'"),
])
def test_bad_device_yaml_names_the_field_and_line(tmp_path, text, message):
    from edgerun import device
    from edgerun.formats.yamlfile import YamlError

    p = tmp_path / "d.yaml"
    p.write_text(text)
    with pytest.raises(YamlError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        device.load(p)


def test_detect_describes_this_machine():
    from edgerun import device
    from profilers.device import detect

    d = detect(measure=False)
    assert d.cores >= 1 and d.threads >= d.cores and d.ram_gib > 0
    assert d.tdp_watts is None  # never guessed
    text = device.to_yaml(d)
    assert "cpu_model" in text


class _CharEngine:
    """A scripted engine over characters (token = code point): ``oracle`` puts all probability on the
    true next character; otherwise every logit is equal."""

    V = 256

    def __init__(self, oracle: bool):
        self.oracle = oracle

    def encode_prompt(self, text):
        return []

    def tokenize(self, text):
        return [min(ord(c), self.V - 1) for c in text]

    def logits(self, tokens):
        import numpy as np

        out = np.zeros((len(tokens), self.V), dtype=np.float32)
        if self.oracle:
            for i, t in enumerate(tokens[1:]):
                out[i, t] = 50.0
        return out


def test_passkey_retrieval_scores_a_perfect_and_a_blind_engine():
    import math

    from profilers.accuracy import passkey_retrieval

    good = passkey_retrieval(_CharEngine(True), n=6, chars=300)
    assert good["digit_accuracy"] == 1.0 and good["key_accuracy"] == 1.0
    assert good["key_nll"] < 1e-6 and len(good["key_nll_items"]) == 6
    blind = passkey_retrieval(_CharEngine(False), n=6, chars=300)
    assert blind["key_nll"] == pytest.approx(6 * math.log(256))           # " " + 5 digits, uniform over 256
    assert blind["key_accuracy"] < 1.0                                     # ties pick the digit 0


def test_paired_difference_separates_a_shift_from_noise():
    import numpy as np

    from edgerun.errors import UsageError
    from profilers.accuracy import paired_difference

    rng = np.random.default_rng(1)
    base = rng.normal(5, 2, 40)
    shifted = paired_difference(base + 0.5 + rng.normal(0, 0.1, 40), base)
    assert shifted["ci95"][0] > 0.3 and shifted["ci95"][1] < 0.7 and shifted["n"] == 40
    noise = paired_difference(base + rng.normal(0, 1, 40), base)
    assert noise["ci95"][0] < 0 < noise["ci95"][1]                       # zero-mean noise: 0 inside
    assert paired_difference([2.0, 3.0], [1.0, 2.0]) == {"mean": 1.0, "ci95": [1.0, 1.0], "n": 2}
    with pytest.raises(UsageError, match="equal-length"):
        paired_difference([1.0, 2.0], [1.0])
