"""Device fleets on Ray (docs/cluster.md): sweeps placed by device, resume across a lost node, KV searches and
expert calibration on a cluster equal to the local run.

The cluster tests start a real Ray cluster on loopback: a head offering device ``test-a`` and a worker
process offering ``test-b`` (both ``edgerun worker``, one CPU each), shared by the module and stopped at
its end; no Ray process may be left behind.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgerun import catalog
from edgerun.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent

SWEEP = """\
name: {name}
devices: [test-a, test-b]
models: [smollm2-135m-instruct]
variants:
  - {{format: gguf, quant: Q8_0}}
  - {{format: gguf, quant: Q4_0}}
backends: [edgerun]
threads: [1]
prompt_tokens: {prompts}
gen_tokens: [8]
repetitions: 1
warmup: 0
ctx_size: 128
accuracy:
  perplexity_windows: 1
"""


def _sweep_file(tmp_path, name="fleet", prompts="[16]"):
    p = tmp_path / f"{name}.yaml"
    p.write_text(SWEEP.format(name=name, prompts=prompts))
    return p


def _records(out):
    return [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]


def _device_configs(directory: Path) -> dict[str, Path]:
    """Two device configs describing this machine under the names test-a and test-b."""
    text = (ROOT / "device_configs" / "this-machine.yaml").read_text()
    out = {}
    for name in ("test-a", "test-b"):
        lines = [f"name: {name}" if line.startswith("name:") else line for line in text.splitlines()]
        out[name] = directory / f"{name}.yaml"
        out[name].write_text("\n".join(lines) + "\n")
    return out


# --- without a cluster ---------------------------------------------------------------------------

def test_a_sweep_that_names_devices_gives_each_cell_its_device(tmp_path):
    from profilers import sweep

    sw = sweep.load(_sweep_file(tmp_path))
    cells = sw.cells()
    assert len(cells) == 4 and [c["device"] for c in cells] == ["test-a", "test-a", "test-b", "test-b"]
    assert sweep.cell_key(cells[0]).startswith("backend=edgerun|device=test-a|")
    # the sweep of the published results names no devices: its digest and cells are as before
    bpw = sweep.load(ROOT / "benchmarks" / "bpw_sweep.yaml")
    assert "device" not in bpw.cells()[0]
    published = ROOT / "benchmarks" / "results" / "bpw_sweep" / "sweep.json"
    if published.is_file():
        assert json.loads(published.read_text())["digest"] == bpw.digest


@pytest.mark.parametrize("devices,message", [
    ("[test-a, test-a]", "line 2: a device is named twice"),
    ("['../a']", "line 2.*must name a device config"),
])
def test_bad_devices_are_refused_with_their_line(tmp_path, devices, message):
    from edgerun.formats.yamlfile import YamlError
    from profilers import sweep

    p = _sweep_file(tmp_path)
    p.write_text(p.read_text().replace("devices: [test-a, test-b]", f"devices: {devices}"))
    with pytest.raises(YamlError, match=message):
        sweep.load(p)


def test_a_local_run_measures_only_the_named_device(tmp_path):
    from profilers import sweep

    sw = sweep.load(_sweep_file(tmp_path))
    assert sweep.local_device_name(sw, "device_configs/test-b.yaml") == "test-b"
    for device in (None, "device_configs/this-machine.yaml"):
        with pytest.raises(UsageError, match="--cluster"):
            sweep.local_device_name(sw, device)
    groups, quality = sweep.todo(sw, set(), "test-b")
    assert [c["device"] for g in groups for c in g] == ["test-b", "test-b"] and len(quality) == 2


def test_resume_runs_again_the_cells_recorded_lost_and_the_report_reads_the_last_record(tmp_path):
    from profilers import report, sweep

    sw = sweep.load(_sweep_file(tmp_path))
    out = tmp_path / "out"
    sweep.open_results(sw, out)
    a, b = sw.cells()[0], sw.cells()[2]
    lost = {"key": sweep.cell_key(b), "cell": b, "status": "error", "error": "lost: ...", "rerun_on_resume": True}
    failed = {"key": sweep.cell_key(a), "cell": a, "status": "error", "error": "ValueError: bad"}
    (out / "runs.jsonl").write_text(json.dumps(failed) + "\n" + json.dumps(lost) + "\n")
    _, done = sweep.open_results(sw, out)
    assert done == {sweep.cell_key(a)}          # an error stays done; a lost cell runs again
    again = {**lost, "status": "ok", "runs": []}
    del again["rerun_on_resume"]
    with open(out / "runs.jsonl", "a") as f:
        f.write(json.dumps(again) + "\n")
    assert sweep.open_results(sw, out)[1] == {sweep.cell_key(a), sweep.cell_key(b)}
    cells, _, other = report.load_runs(out)
    assert [r["status"] for r in cells] == ["ok"] and [r["status"] for r in other] == ["error"]


def test_worker_command_offers_one_unit_of_the_device_resource_in_the_foreground():
    from profilers import cluster

    cmd = cluster.worker_command("framework13", address="10.0.0.2:6379", num_cpus=4)
    assert cmd[1:4] == ["-m", "ray.scripts.scripts", "start"] and "--block" in cmd
    assert json.loads(cmd[cmd.index("--resources") + 1]) == {"device:framework13": 1}
    assert "--address=10.0.0.2:6379" in cmd and "--num-cpus=4" in cmd and "--head" not in cmd
    head = cluster.worker_command("x", head=True, port=7000, client_port=7001)
    assert "--head" in head and "--port=7000" in head and "--ray-client-server-port=7001" in head
    with pytest.raises(UsageError, match="--address HOST:PORT"):
        cluster.worker_command("x")


def test_worker_finds_the_config_that_describes_this_machine(tmp_path, monkeypatch):
    from edgerun.device import this_machine, to_yaml
    from profilers import cluster

    me = this_machine()
    (tmp_path / "mine.yaml").write_text(to_yaml(me))
    other = me.as_dict() | {"cores": me.cores + 2, "threads": me.threads + 2}
    (tmp_path / "bigger.yaml").write_text(to_yaml(type(me)(**other)))
    name, cfg, how = cluster.detect_config(tmp_path)
    assert name == "mine" and cfg.cores == me.cores and "matched" in how
    (tmp_path / "mine.yaml").unlink()
    name, cfg, how = cluster.detect_config(tmp_path)     # none matches: detected under the host's name
    assert cfg.cores == me.cores and "no config" in how
    monkeypatch.setenv("EDGERUN_HOME", str(tmp_path / "home"))
    path = cluster.install_config("laptop-1", me)
    assert path == tmp_path / "home" / "devices" / "laptop-1.yaml" and cluster.node_device("laptop-1").cores == me.cores
    with pytest.raises(UsageError, match="edgerun worker --device nowhere"):
        cluster.node_device("nowhere")


def test_bad_cluster_addresses_and_sweeps_without_devices_are_refused(tmp_path):
    from profilers import cluster, sweep

    with pytest.raises(UsageError, match="bad --cluster address"):
        with cluster.connected("http://head:6379"):
            pass
    p = _sweep_file(tmp_path)
    p.write_text(p.read_text().replace("devices: [test-a, test-b]\n", ""))
    with pytest.raises(UsageError, match="names no devices"):
        cluster.run_sweep(sweep.load(p), tmp_path / "out", "127.0.0.1:1")


def test_batched_nsga2_proposes_the_trials_of_one_at_a_time_optimize(tmp_path):
    """A generation asked at once and told in order = Optuna asking and telling trial by trial (same seed)."""
    import optuna

    from edgerun.kv import tune as kvt
    from edgerun.kv.cache import PAIRS
    from edgerun.kv.layout import Layout

    rng = np.random.default_rng(0)
    per_bit = np.array([[2.0 ** (-2 * kvt.pair_bits(p)) for p in kvt.QUANT_PAIRS]])
    errors = rng.random((6, 1)) * 10 ** rng.integers(0, 3, (6, 1)) * per_bit      # 6 layers' sensitivity
    weights = rng.random(6)

    def quality(lay):                          # a deterministic stand-in for the evaluator
        kl = float(sum(w * (16 - k) ** 2 + w * (16 - v) for w, (k, v) in zip(weights, lay.pairs)))
        return {"kl": kl, "ppl": 10 + kl}

    def layout_of(choice, name=""):
        return Layout([PAIRS[p] for p in choice], "per-token", 32, 32, name=name)

    uniform = {u: quality(layout_of([u] * 6)) for u in kvt.UNIFORM}
    batches = []

    def evaluate_many(layouts):
        batches.append(len(layouts))
        return [quality(lay) for lay in layouts]

    rows, labels, candidates = kvt._nsga2_search(errors, evaluate_many, layout_of, uniform, 4.0, 14, 4, 3, 0, "t",
                                                 tmp_path, False, lambda m: None)
    assert max(batches) > 1                    # generations were evaluated as batches

    # the reference: Optuna's optimize, one trial at a time, same objective and stopping rule
    sampler = optuna.samplers.NSGAIISampler(population_size=4, seed=0)
    study = optuna.create_study(sampler=sampler, directions=["minimize", "minimize"])
    n_groups = len(candidates)
    for u in kvt.UNIFORM:
        if kvt.pair_bits(u) <= 4.0 and all(u in c for c in candidates):
            study.enqueue_trial({f"g{g}": u for g in range(n_groups)}, user_attrs={"uniform": u})
    memo = {}

    def objective(trial):
        choice = tuple(trial.suggest_categorical(f"g{g}", candidates[g]) for g in range(n_groups))
        lay = layout_of([choice[labels[i]] for i in range(6)])
        trial.set_constraint("avg_bits", lay.average_bits - 4.0)
        if lay.average_bits > 4.0:
            return 1e3, lay.average_bits
        memo.setdefault(choice, quality(lay)["kl"])
        return memo[choice], lay.average_bits

    study.optimize(objective, n_trials=140, callbacks=[lambda s, t: len(memo) >= 14 and s.stop()])
    ours = [(r["number"], r["choice"], r["kl"]) for r in rows]
    reference = [(t.number, [t.params[f"g{labels[i]}"] for i in range(6)], t.values[0]) for t in study.trials
                 if t.values[0] < 1e3]
    assert ours == reference and len(memo) == 14


# --- on a local Ray cluster ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fleet(tmp_path_factory, smollm2_source):
    """A Ray cluster on loopback: head (device test-a) and one worker process (device test-b), one CPU each."""
    pytest.importorskip("ray", reason="the cluster tests need Ray: pip install -e '.[dev]' installs it")
    from ray_nodes import LocalCluster, linked_home, ray_processes

    before = ray_processes()
    tmp = tmp_path_factory.mktemp("fleet")
    configs = _device_configs(tmp)
    home = linked_home(catalog.home(), tmp / "home")
    with LocalCluster(tmp / "ray", env={"EDGERUN_HOME": str(home)}) as lc:
        lc.start("head", configs["test-a"], head=True)
        lc.start("b1", configs["test-b"])
        lc.wait_for({"test-a": 1, "test-b": 1})
        yield lc, configs
    deadline = time.monotonic() + 30
    while ray_processes() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ray_processes() - before, "Ray processes left behind"


def _node_ids(address) -> dict[str, set[str]]:
    from profilers import cluster

    with cluster.connected(address) as ray:
        return {d: set(n) for d, n in cluster.alive_devices(ray).items()}


@pytest.mark.slow
def test_each_cell_runs_on_a_node_of_its_device_and_records_what_a_local_run_records(fleet, tmp_path):
    from edgerun.device import load as load_device
    from profilers import cluster, sweep

    lc, configs = fleet
    sw = sweep.load(_sweep_file(tmp_path))
    out = tmp_path / "cluster"
    cluster.run_sweep(sw, out, lc.address, progress=False, log=lambda m: None)
    nodes = _node_ids(lc.address)
    recs = _records(out)
    cells = [r for r in recs if r.get("kind") != "quality"]
    assert sorted((r["cell"]["device"], r["cell"]["variant"]) for r in cells) == [
        ("test-a", "Q4_0"), ("test-a", "Q8_0"), ("test-b", "Q4_0"), ("test-b", "Q8_0")]
    for r in cells:
        assert r["status"] == "ok" and r["device"] == r["cell"]["device"]      # measured with the node's config
        assert r["node"]["ray_node_id"] in nodes[r["cell"]["device"]]
        assert [run["metrics"]["generated_tokens"] for run in r["runs"]] == [8]
    assert sorted(q["variant"] for q in recs if q.get("kind") == "quality") == ["Q4_0", "Q8_0"]

    local = tmp_path / "local"               # the same sweep here, as device test-a
    sweep.run(sw, local, device=load_device(configs["test-a"]), progress=False, log=lambda m: None,
              device_name="test-a")
    here = {r["key"]: r for r in _records(local)}
    assert len(here) == 4                   # test-a's two cells and the two quality records
    for r in cells:
        if r["key"] in here:
            mine = here[r["key"]]
            assert set(r) == set(mine) and set(r["runs"][0]["metrics"]) == set(mine["runs"][0]["metrics"])
            assert set(r["machine"]) == set(mine["machine"]) and mine["node"]["ray_node_id"] is None


@pytest.mark.slow
def test_a_sweep_resumes_on_the_cluster_after_a_worker_is_stopped(fleet, tmp_path):
    from profilers import cluster, report, sweep

    lc, configs = fleet
    sw = sweep.load(_sweep_file(tmp_path, name="fleet-resume", prompts="[16, 24]"))   # 4 groups per device
    out = tmp_path / "out"
    run = threading.Thread(target=cluster.run_sweep, args=(sw, out, lc.address),
                           kwargs=dict(progress=False, log=lambda m: None, poll_s=0.5))
    run.start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and run.is_alive():    # stop test-b's node once it finished one group
        if (out / "runs.jsonl").is_file() and any(r.get("cell", {}).get("device") == "test-b" for r in _records(out)):
            break
        time.sleep(0.1)
    lc.stop("b1")
    run.join(timeout=300)
    assert not run.is_alive()
    first = _records(out)
    b = [r for r in first if r.get("cell", {}).get("device") == "test-b"]
    ok_keys = {r["key"] for r in first if r["status"] == "ok"}
    lost = [r for r in b if r["status"] == "error"]
    assert lost and all(r["rerun_on_resume"] and "test-b" in r["error"] and "lost" in r["error"] for r in lost)
    assert all(r["status"] == "ok" for r in first if r.get("cell", {}).get("device") == "test-a")

    lc.start("b2", configs["test-b"])                           # a test-b node again, then resume
    lc.wait_for({"test-a": 1, "test-b": 1})
    cluster.run_sweep(sw, out, lc.address, progress=False, log=lambda m: None)
    final = _records(out)
    counts = {}
    for r in final:
        counts[r["key"]] = counts.get(r["key"], 0) + 1
    assert all(counts[k] == 1 for k in ok_keys)                  # nothing finished ran again
    assert all(counts[r["key"]] == 2 for r in lost)              # the lost cells ran once more
    cells, quality, other = report.load_runs(out)
    assert len(cells) == 8 and len(quality) == 2 and not other


@pytest.fixture(scope="module")
def tiny_dense(tmp_path_factory, smollm2_source):
    from conftest import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("kv") / "tiny", "llama", smollm2_source.path)


@pytest.mark.slow
def test_a_kv_search_on_the_cluster_finds_the_local_front(fleet, tiny_dense, tmp_path):
    from edgerun.kv import tune as kvt
    from profilers import cluster

    lc, _ = fleet
    kw = dict(budget=4.0, trials=4, population=4, groups=2, context=256, contexts=1, calib_windows=1, calib_len=128,
              search="nsga2", seed=0, progress=False, log=lambda m: None)
    local = kvt.tune(tiny_dense, tmp_path / "local", threads=1, **kw)
    with cluster.LayoutPool(f"ray://127.0.0.1:{lc.client_port}", str(tiny_dense), tiny_dense) as pool:   # Ray Client
        assert len(pool.actors) == 2                              # one evaluator per CPU of the cluster
        remote = kvt.tune(tiny_dense, tmp_path / "cluster", evaluate=pool, **kw)
    a, b = (json.loads((tmp_path / d / "trials.json").read_text()) for d in ("local", "cluster"))
    assert a["sensitivity_kl"] == b["sensitivity_kl"] and a["uniform"] == b["uniform"]
    assert a["trials"] == b["trials"] and len([t for t in a["trials"] if not t["uniform"]]) >= 1
    assert [(lay.pairs, lay.meta["kl"]) for lay in local.front] == [(lay.pairs, lay.meta["kl"]) for lay in remote.front]


@pytest.mark.slow
def test_expert_calibration_on_the_cluster_equals_the_local_one(fleet, tiny_dense, tmp_path):
    import torch
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    from edgerun.moe import calibrate as cal
    from profilers import cluster

    lc, _ = fleet
    torch.manual_seed(0)
    moe = MixtralForCausalLM(MixtralConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512,
                                           bos_token_id=1, eos_token_id=2))
    moe.save_pretrained(tmp_path / "moe")
    AutoTokenizer.from_pretrained(tiny_dense).save_pretrained(tmp_path / "moe")
    tasks = [("wiki", "wiki"), ("code", "code")]
    model, tokenizer = cal.load_model(tmp_path / "moe", threads=1)
    here = cal.calibrate(model, tokenizer, tasks, tokens=512, name="moe")
    there = cluster.calibrate_tasks(lc.address, str(tmp_path / "moe"), tasks, 512, 0, "raw-logit", "moe",
                                    progress=False)
    assert [p.to_json() for p in there] == [p.to_json() for p in here]
    assert here[0].ranking(0) != here[1].ranking(0) or here[0].key().tolist() != here[1].key().tolist()


def test_ray_is_imported_only_by_cluster_runs():
    """`edgerun chat` and a local sweep do not pay Ray's import (about a second)."""
    import subprocess
    import sys

    code = ("import sys, edgerun.cli, profilers.cluster\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_cli_worker_prints_the_ray_start_of_a_device_and_bench_refuses_a_bad_address(tmp_path):
    import subprocess

    from conftest import cli_env, edgerun_cmd

    configs = _device_configs(tmp_path)
    r = subprocess.run(edgerun_cmd("worker", "--head", "--device", str(configs["test-a"]), "--dry-run"),
                       capture_output=True, text=True, env=cli_env(), timeout=120)
    assert r.returncode == 0 and "'{\"device:test-a\": 1}'" in r.stdout and "--head" in r.stdout
    assert "device test-a (from" in r.stderr
    r = subprocess.run(edgerun_cmd("bench", str(_sweep_file(tmp_path)), "--out", str(tmp_path / "o"),
                                   "--cluster", "nowhere"), capture_output=True, text=True, env=cli_env(), timeout=120)
    assert r.returncode == 2 and "bad --cluster address 'nowhere'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()                        # nothing written before the cluster is reached
