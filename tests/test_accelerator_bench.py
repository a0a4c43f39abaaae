"""benchmarks/speed/accelerator.py on its tiny shape: one command, every field of the JSON report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "accelerator.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed" / "accelerator.py"), "--shapes", "tiny",
                           "--bandwidth", "100", "--peak-tflops", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "our AR (scan)" in done.stdout and "roofline" in done.stdout
    return json.loads(out.read_text())


def test_report_has_every_measurement(report):
    assert report["backend"] == "cpu" and report["dtype"] == "float32"
    row = report["shapes"]["tiny"]
    auto, other = "per_layer", "scan"  # a CPU decodes with the per-layer loop (model/llama.py)
    assert row["auto_layer_loop"] == auto and not row["skipped"]
    for loop in ("scan", "per_layer"):
        ar = row["ar"][loop]
        assert ar["tokens"] == 32 and ar["tokens_per_s"] > 0
        assert abs(ar["ms_per_token"] - 1e3 / ar["tokens_per_s"]) < 1e-6
    assert sorted(row["pass_ms"][auto], key=int) == ["1", "8", "16", "32", "64"]
    assert list(row["pass_ms"][other]) == ["1"]
    assert row["pass_ratio"]["1"] == 1.0
    for n in ("8", "16"):  # the whole rolling + lookup loop: ms per pass against AR's ms per token
        d = row["decode"][n]
        assert d["block_size"] == int(n) and d["init"] == "lookup" and 1 <= d["forward_passes"] <= 32
        assert d["break_even_tpf"] == pytest.approx(d["ms_per_pass"] / row["ar"][auto]["ms_per_token"])
    for cache in ("dynamic", "static"):
        assert row["transformers"][cache]["tokens_per_s"] > 0
    assert row["speedup_vs_static"] > 0
    train = row["train"]
    assert train["rows"] == 2 and train["seq_len"] == 64 and train["tokens_per_s"] > 0 and 0 < train["mfu"] < 1


def test_roofline_follows_from_the_shape(report):
    """Recomputed by hand from the tiny shape: 2 layers, d=64, f=128, 4 heads (2 KV) of 16, vocab 512 untied."""
    row = report["shapes"]["tiny"]
    d, f, vocab, layers, kv_dim = 64, 128, 512, 2, 2 * 16
    per_layer = 2 * d + d * d + 2 * d * kv_dim + d * d + 3 * d * f
    assert row["params"] == 2 * vocab * d + layers * per_layer + d
    weights = (vocab * d + layers * per_layer + d) * 4  # the embedding is only looked up: not read whole
    kv = 2 * layers * kv_dim * 4 * (16 + 32 / 2)
    assert row["weight_bytes_per_token"] == weights and row["kv_bytes_per_token"] == kv
    roof = row["roofline"]
    assert roof["tokens_per_s"] == pytest.approx(100e9 / (weights + kv))
    assert roof["share"] == pytest.approx(row["ar"][row["auto_layer_loop"]]["tokens_per_s"] / roof["tokens_per_s"])
