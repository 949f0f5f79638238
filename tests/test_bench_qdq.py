"""The quantization benchmark's verdicts (tools/bench_qdq.py): each target is judged from its rows,
and a row that misses says no. Pure functions on hand-written rows; nothing is quantized here."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import bench_qdq  # noqa: E402


def row(model, kind, tool, cosine, task=None, drop=None, size=0.25):
    return {"model": model, "kind": kind, "tool": tool, "cosine": cosine, "task": task, "drop": drop, "size": size}


def verdicts(rows, rss=()):
    return {t: ok for t, _, ok in bench_qdq.targets(list(rows), list(rss))}


def test_the_embedder_target_needs_cosine_recall_and_size():
    ok = verdicts([row("e", "embedder", "default", 0.991, 35.0, 0.5, 0.25)])
    assert ok == {"e: default cosine >= 0.99, recall@1 drop <= 1, size <= 0.30x": True}
    for bad in (row("e", "embedder", "default", 0.9897, 35.0, 0.5), row("e", "embedder", "default", 0.995, 34.0, 1.5),
                row("e", "embedder", "default", 0.995, 35.0, 0.5, size=0.31)):
        assert list(verdicts([bad]).values()) == [False]


def test_the_ocr_target_and_the_ort_comparison():
    rows = [row("r", "ocr", "default", 0.99, 86.6, 1.95, 0.28), row("c", "cnn", "default", 0.9990, 90.0),
            row("c", "cnn", "ort_static", 0.9995, 89.0)]
    ok = verdicts(rows)
    assert ok["r: default exact-match drop <= 2 points at size <= 0.40x"] is True
    assert ok["c: default at least ORT quantize_static"] is False  # cosine below the anchor's
    rows[0]["drop"] = 2.05
    assert verdicts(rows)["r: default exact-match drop <= 2 points at size <= 0.40x"] is False


def test_woq_pairs_gptq_over_rtn_and_flat_memory():
    rows = [row("t", "transformer", "woq4_rtn", 0.9993), row("t", "transformer", "ort_nbits4_rtn", 0.9992),
            row("t", "transformer", "woq4_hqq", 0.97402), row("t", "transformer", "ort_nbits4_hqq", 0.97408),
            row("t", "transformer", "woq4_gptq", 0.9990), {"model": "t", "kind": "transformer", "tool": "ort_nbits4_gptq",
                                                           "error": "failed"}]
    rss = [{"model": "m", "samples": 32, "rss_mib": 1000.0, "file_mib": 1.0},
           {"model": "m", "samples": 256, "rss_mib": 1150.0, "file_mib": 8.0}]
    ok = verdicts(rows, rss)
    assert ok["t: woq 4-bit rtn at or above ORT's rtn"] is True
    assert ok["t: woq 4-bit hqq at or above ORT's hqq"] is False
    assert "t: woq 4-bit gptq at or above ORT's gptq" not in ok  # a failed anchor judges nothing
    assert ok["t: woq 4-bit GPTQ above RTN"] is False  # 0.9990 is not above 0.9993
    assert ok["m: calibration peak RSS flat in the sample count (within 10%)"] is False  # +15%
