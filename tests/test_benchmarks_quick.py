"""Smoke test of benchmarks/: every script runs in --quick mode and prints its table.

The scripts run in subprocesses (two at a time: each is single-threaded), with
their results JSON written to a temporary directory; if matplotlib is
installed, the plots are drawn from those files too. The numbers of --quick
runs (tiny models, a few steps) mean nothing; only that everything runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"

#: script -> (results name, lines its output must contain)
SCRIPTS = {
    "bench_generate.py": ("generate", ["Generation speed relative to stock transformers", "| greedy",
                                       "| beam 4", "Patch overhead per generate() call",
                                       "Greedy throughput vs source length"]),
    "bench_train.py": ("train", ["Training step: CPU time and peak memory", "| stock fwd+bwd (all params)",
                                 "| prefix-tuning step", "Trainable parameters vs prefix length"]),
    "bench_mixed.py": ("mixed", ["Mixed-task batch vs single-task batches", "| greedy | mixed batch",
                                 "| beam 4 | 4 single-task batches of 4"]),
    "bench_compile.py": ("compile", ["Compiled speed without a prefix", "| forward (torch.compile(model))",
                                     "| greedy generate, 4 new tokens (compiled forward)",
                                     "patched, no prefix (compiled)"]),
    "bench_compile_entry.py": ("compile_entry", ["Compiled greedy generate() in one patched process",
                                                 "| prefix 4, as shipped", "| prefix 4, state read at a graph break",
                                                 "| encoder, prefix 4", "same tokens, as shipped and state read at "
                                                 "a graph break: True"]),
    "bench_floor.py": ("floor", ["The floor of a 4-token prefix", "| minimal loop (buffer), prefix 4",
                                 "| minimal loop (cat), prefix 4", "| patched generate(), prefix 4",
                                 "minimal loop (cat): the prefix's own cost",
                                 "minimal loop decodes generate()'s tokens: {'buffer, no prefix': True, 'buffer, "
                                 "prefix': True, 'cat, no prefix': True, 'cat, prefix': True}"]),
    "bench_memory.py": ("memory", ["Memory of one generate()", "| greedy", "patched, prefix 20"]),
    "bench_sdpa_keys.py": ("sdpa_keys", ["sdpa time with 20 more keys", "| encoder self-attention",
                                         "| decoding step, cross-attention"]),
    "bench_learning.py": ("learning", ["Exact match (%) of greedy generate()", "| full prefix (enc+dec+cross)",
                                       "| stock behaviour (cross replaces encoder)", "| full fine-tuning"]),
}


def _run(script: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", "--out", str(out), *extra],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, check=False,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bench")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {script: pool.submit(_run, script, directory / f"{name}.json")
                   for script, (name, _) in SCRIPTS.items()}
        return directory, {script: future.result() for script, future in futures.items()}


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_quick_mode_prints_its_table(runs, script):
    directory, results = runs
    done = results[script]
    assert done.returncode == 0, f"{script} --quick failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    for expected in SCRIPTS[script][1]:
        assert expected in done.stdout, f"{script}: {expected!r} missing from its output:\n{done.stdout}"
    data = json.loads((directory / f"{SCRIPTS[script][0]}.json").read_text())
    assert data["quick"] is True and data["machine"]["torch_threads"] == 1


def test_cache_growth_quick(tmp_path):
    done = _run("bench_sdpa_keys.py", tmp_path / "cache_growth.json", "--cache-growth")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| preallocated buffer" in done.stdout and "self-attention cache growth" in done.stdout
    assert json.loads((tmp_path / "cache_growth.json").read_text())["layers"] == 2


def test_plots_from_quick_results(runs, tmp_path):
    pytest.importorskip("matplotlib")
    directory, results = runs
    if any(done.returncode for done in results.values()):
        pytest.skip("a benchmark failed (reported by its own test)")
    done = subprocess.run([sys.executable, str(BENCHMARKS / "plots.py"), "--results", str(directory), "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    drawn = sorted(p.name for p in tmp_path.glob("*.png"))
    assert drawn == sorted(["generate_speed.png", "generate_sweep.png", "learning_curves.png", "train_step.png",
                            "memory.png"]), drawn


def test_sites_quick(tmp_path):
    done = _run("bench_generate.py", tmp_path / "generate_sites.json", "--part", "sites")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for row in ("| prefix 20: encoder", "| prefix 20: decoder self-attention", "| prefix 20: cross-attention",
                "| prefix 20: all three", "| sum of the three single-site rows"):
        assert row in done.stdout, done.stdout
    sites = json.loads((tmp_path / "generate_sites.json").read_text())["sites"]
    assert len(sites) == 4 and all(len(entry["extra_cpu_s"]) == 1 for entry in sites.values())


def test_halves_quick(tmp_path):
    done = _run("bench_generate.py", tmp_path / "generate_halves.json", "--part", "halves")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| encoder alone  | encoder" in done.stdout and "| decoding alone | decoder+cross" in done.stdout, done.stdout
    halves = json.loads((tmp_path / "generate_halves.json").read_text())["halves"]
    assert sorted(halves) == ["decoding alone", "encoder alone"]


def test_prefix_lengths_quick(tmp_path):
    done = _run("bench_generate.py", tmp_path / "generate_prefix_lengths.json", "--part", "prefix-lengths")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for row in ("| patched, no prefix", "| prefix 1 ", "| prefix 20 ", "| prefix 80 "):
        assert row in done.stdout, done.stdout
    rows = json.loads((tmp_path / "generate_prefix_lengths.json").read_text())["prefix_lengths"]
    assert sorted(rows) == ["patched, no prefix", "prefix 1", "prefix 20", "prefix 80"]
    assert all(len(entry["extra_cpu_s"]) == 1 for entry in rows.values())


def test_prefix_lengths_by_site_quick(tmp_path):
    done = _run("bench_generate.py", tmp_path / "generate_prefix_lengths.json", "--part", "prefix-lengths",
                "--lengths-sites", "each", "--prefix-lengths", "20")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "generate_prefix_lengths.json").read_text())["prefix_lengths"]
    assert sorted(rows) == ["patched, no prefix", "prefix 20: cross-attention", "prefix 20: decoder self-attention"]


def test_decode_step_quick(tmp_path):
    done = _run("bench_sdpa_keys.py", tmp_path / "decode_step.json", "--decode-step")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "scores joined == keys/values joined (atol 1e-5): True" in done.stdout, done.stdout
    assert "plain matmuls == sdpa (atol 1e-5): True" in done.stdout, done.stdout
    for row in ("| stock, no prefix", "| prefix 20: keys/values joined", "| prefix 20: scores joined",
                "| stock, 24 keys", "| prefix 20: sdpa over 44 keys", "| prefix 20: plain matmuls over 44 keys"):
        assert row in done.stdout, done.stdout
    written = json.loads((tmp_path / "decode_step.json").read_text())
    assert written["same_output"] is True and written["cross_same_output"] is True


def test_paths_quick(tmp_path):
    done = _run("bench_generate.py", tmp_path / "generate_paths.json", "--part", "paths")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| keys/values joined" in done.stdout and "| scores joined" in done.stdout, done.stdout
    assert "same tokens on both paths: True" in done.stdout, done.stdout
    paths = json.loads((tmp_path / "generate_paths.json").read_text())["paths"]
    assert sorted(paths) == ["keys/values joined", "scores joined"]
    assert all({"per_step_s", "per_call_s", "4", "8"} <= set(entry) for entry in paths.values()), paths
