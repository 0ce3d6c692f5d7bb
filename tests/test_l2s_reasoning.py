"""benchmarks/l2s_reasoning.py: the Long-to-Short table on the reasoning testbed (summary rows, paired
comparisons, bad input) and the bootstrap helpers it uses (profilers.accuracy)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import cli_env, make_tiny_checkpoint
from edgerun import reasoning
from edgerun.errors import UsageError
from profilers.accuracy import bootstrap_mean, paired_ratio, wilson_interval

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import l2s_reasoning  # noqa: E402


def test_paired_ratio_of_an_exact_multiple_is_a_point():
    b = [100.0, 250.0, 40.0, 310.0]
    assert paired_ratio([x / 2 for x in b], b) == {"ratio": 0.5, "ci95": [0.5, 0.5], "n": 4}


def test_paired_ratio_interval_covers_the_ratio_and_pairs_the_items():
    rng = np.random.default_rng(0)
    long = rng.integers(100, 500, 300).astype(float)          # per-problem lengths vary a lot ...
    short = 0.6 * long + rng.normal(0, 5, 300)                 # ... but the pair's ratio hardly does
    r = paired_ratio(short, long, seed=0, resamples=2000)
    lo, hi = r["ci95"]
    assert lo < r["ratio"] < hi and lo < 0.6 < hi and hi - lo < 0.02   # pairing removes the length spread
    assert paired_ratio(short, long, seed=0, resamples=2000) == r      # fixed seed, same interval
    with pytest.raises(UsageError, match="equal-length"):
        paired_ratio([1.0, 2.0], [1.0])
    with pytest.raises(UsageError, match="non-zero mean"):
        paired_ratio([1.0, 2.0], [0.0, 0.0])


def test_bootstrap_mean_interval():
    x = np.random.default_rng(1).normal(200, 30, 300)
    m = bootstrap_mean(x, resamples=2000)
    assert m["ci95"][0] < 200 < m["ci95"][1] and m["ci95"][1] - m["ci95"][0] < 4 * 30 / np.sqrt(300) * 1.2
    assert bootstrap_mean([7, 7, 7]) == {"mean": 7.0, "ci95": [7.0, 7.0], "n": 3}
    with pytest.raises(UsageError):
        bootstrap_mean([1.0])


def test_summarize_counts_exact_matches_kinds_cap_and_thinking():
    problems = reasoning.problems("test", 8)
    outputs = []
    for i, p in enumerate(problems):
        if i < 3:      # long, right
            outputs.append((reasoning.system2_reply(p), 200, False))
        elif i < 5:    # short, right
            outputs.append((reasoning.system1_reply(p), 8, False))
        elif i == 5:   # cut at the cap inside its thinking: no answer (reasoning.final_answer), wrong
            outputs.append(("<think>\nStep 1: ... So the answer is " + p.answer, 640, True))
        else:          # short, wrong
            outputs.append((f"The answer is {int(p.answer) + 1}.", 8, False))
    row, per = l2s_reasoning.summarize(outputs, problems, resamples=200)
    assert per["correct"] == [1, 1, 1, 1, 1, 0, 0, 0]
    assert row["correct"] == 5 and row["accuracy"] == 0.625
    assert row["ci95"] == [round(x, 4) for x in wilson_interval(5, 8)]
    assert row["capped"] == 0.125 and row["think"] == 0.375
    assert row["mean_tokens"]["mean"] == (3 * 200 + 4 * 8 + 640) / 8
    kinds = {}
    for p, c in zip(problems, per["correct"]):
        kinds.setdefault(p.kind, [0, 0])
        kinds[p.kind][0] += 1
        kinds[p.kind][1] += c
    assert {k: (v["n"], v["correct"]) for k, v in row["per_kind"].items()} == {k: tuple(v) for k, v in kinds.items()}
    with pytest.raises(UsageError):
        l2s_reasoning.summarize(outputs[:3], problems)


def test_compare_pairs_accuracy_and_length_by_problem():
    ref = {"correct": [1] * 50 + [0] * 50, "tokens": [300, 100] * 50}
    row = {"correct": [1] * 80 + [0] * 20, "tokens": [150, 50] * 50}
    c = l2s_reasoning.compare(row, ref, resamples=500)
    assert c["accuracy_diff"]["mean"] == 0.3 and c["accuracy_diff"]["ci95"][0] > 0
    assert c["length_ratio"] == {"ratio": 0.5, "ci95": [0.5, 0.5], "n": 100}


def test_render_lists_each_row_with_its_comparisons():
    problems = reasoning.problems("test", 6)
    rows, per = {}, {}
    for name, reply in (("system1", reasoning.system1_reply), ("system2", reasoning.system2_reply)):
        rows[name], per[name] = l2s_reasoning.summarize([(reply(p), len(reply(p)) // 4, False) for p in problems],
                                                        problems, resamples=200)
        rows[name]["problem_ids_sha"] = "x"
    l2s_reasoning.add_comparisons(rows, per, resamples=200)
    assert "vs_system1" not in rows["system1"] and rows["system1"]["vs_system2"]["length_ratio"]["ratio"] < 0.2
    rows["system2"]["generate_seconds"] = rows["system1"]["generate_seconds"] = 1.0
    settings = {"n": 6, "max_new_tokens": 640, "threads": 2, "batch": 32, "resamples": 200,
                "reference_system2_tokens": {"max": 400, "mean": 250.0},
                "load_avg_start": [1.0], "load_avg_end": [2.0], "training": {"system1": None, "system2": None}}
    md = l2s_reasoning.render(rows, settings)
    assert "| system1 | 1.000 [" in md and "| system2 | 1.000 [" in md and "+0.000 [+0.000, +0.000]" in md


def test_bad_input_is_one_line(tmp_path, capsys):
    assert l2s_reasoning.main(["--only", "system3", "--results", str(tmp_path)]) == 2
    assert "unknown row(s) system3" in capsys.readouterr().err
    assert l2s_reasoning.main(["--system1", str(tmp_path / "none"), "--results", str(tmp_path)]) == 2
    assert "no system1 checkpoint" in capsys.readouterr().err
    assert l2s_reasoning.main(["--n", "1", "--results", str(tmp_path)]) == 2
    assert "--n must be >= 2" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_end_to_end_on_tiny_parents_and_resume(smollm2_source, tmp_path):
    s1 = make_tiny_checkpoint(tmp_path / "s1", "llama", smollm2_source.path, seed=0)
    s2 = make_tiny_checkpoint(tmp_path / "s2", "llama", smollm2_source.path, seed=1)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "l2s_reasoning.py"), "--n", "4", "--max-new", "32",
           "--batch", "4", "--resamples", "200", "--system1", str(s1), "--system2", str(s2),
           "--merges", str(tmp_path / "merges"), "--results", str(tmp_path / "out")]
    subprocess.run(cmd + ["--only", "system1,system2,ta-0.5,aim-ties"], check=True, env=cli_env(),
                   capture_output=True)
    res = json.loads((tmp_path / "out" / "l2s_reasoning.json").read_text())
    replies = json.loads((tmp_path / "out" / "l2s_reasoning_replies.json").read_text())
    assert list(res["rows"]) == ["system1", "system2", "ta-0.5", "aim-ties"]
    assert replies["problem_ids"] == [p.id for p in reasoning.problems("test", 4)]
    for name, row in res["rows"].items():
        assert row["n"] == 4 and len(replies["rows"][name]["replies"]) == 4
        assert all(1 <= t <= 32 for t in replies["rows"][name]["tokens"])
    ta = res["rows"]["ta-0.5"]
    assert ta["merge"]["method"] == "task-arithmetic" and ta["merge"]["alpha"] == 0.5 and ta["merge_peak_rss_mib"] > 0
    assert res["rows"]["aim-ties"]["merge"]["method"] == "aim-ties"
    assert {"vs_system1", "vs_system2"} <= set(ta) and "length_ratio" in ta["vs_system2"]
    assert "| aim-ties |" in (tmp_path / "out" / "l2s_reasoning.md").read_text()
    # resume: rows not named by --only are kept as they were, the merge is not redone
    merge_mtime = (tmp_path / "merges" / "ta-0.5" / "edgerun_merge.json").stat().st_mtime
    subprocess.run(cmd + ["--only", "system1"], check=True, env=cli_env(), capture_output=True)
    again = json.loads((tmp_path / "out" / "l2s_reasoning.json").read_text())
    assert again["rows"]["ta-0.5"]["generate_seconds"] == ta["generate_seconds"]
    assert (tmp_path / "merges" / "ta-0.5" / "edgerun_merge.json").stat().st_mtime == merge_mtime


def test_generate_drops_finished_replies_and_matches_transformers_generate(smollm2_source):
    """l2s_table.generate (finished replies leave the batch) gives transformers' greedy ``generate`` replies."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from l2s_table import generate

    tok = AutoTokenizer.from_pretrained(smollm2_source.path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_source.path, dtype=torch.float32).eval()
    questions = [p.question for p in reasoning.problems("test", 3)] + ["Say hi.", "Name a color, one word."]
    mine = generate(model, tok, questions, 24, len(questions))
    stop = [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    enc = tok([tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in questions], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        ref = model.generate(**enc, max_new_tokens=24, do_sample=False, eos_token_id=stop, pad_token_id=stop[0])
    for (text, n, capped), row in zip(mine, ref[:, enc.input_ids.shape[1]:].tolist()):
        end = next((j + 1 for j, t in enumerate(row) if t in stop), None)
        assert (n, capped) == (end or 24, end is None)
        assert text == tok.decode(row[:n], skip_special_tokens=True)
    assert any(not capped for _, _, capped in mine) and any(capped for _, _, capped in mine)   # both paths taken
