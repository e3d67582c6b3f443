"""`vlsi bench`: a quick real run on a tiny model produces the table and JSON with every column
(no timing assertions: the machines are shared), each backend measured in its own process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from onnx_helpers import export_once

from vlsi_model.bench import BASELINE, COLUMNS, bench_inputs, format_table, summarize
from vlsi_model.cli import main as cli_main
from vlsi_model.engine.tensorrt_engine import tensorrt_available


def test_bench_inputs_are_deterministic_camera_frames():
    a, b = bench_inputs(3, seed=0), bench_inputs(3, seed=0)
    assert [q for _, q in a] == [q for _, q in b]
    assert all(img.shape == (480, 640, 3) for img, _ in a)
    assert len({q for _, q in bench_inputs(6)}) > 1


def test_summarize_and_table_from_runs():
    base = {"load_s": 1.0, "peak_rss_mb": 300.0, "torch_imported": True, "threads": 1,
            "runs": [{"total_ms": 100.0, "token_ids": [1, 2, 3], "question": "What objects are there?"},
                     {"total_ms": 120.0, "token_ids": [4], "question": "What color is the cube?"}]}
    eng = {"load_s": 0.5, "peak_rss_mb": 100.0, "torch_imported": False, "threads": 1,
           "runs": [{"vision_ms": 2.0, "prefill_ms": 3.0, "decode_ms": 10.0, "total_ms": 20.0, "token_ids": [1, 2, 3],
                     "question": "What objects are there?"},
                    {"vision_ms": 2.0, "prefill_ms": 3.0, "decode_ms": 0.0, "total_ms": 24.0, "token_ids": [5],
                     "question": "What color is the cube?"}]}
    s = summarize(eng, base["runs"])
    assert s["speedup_vs_generate"] == 5.0 and s["same_tokens_as_generate"] == 1
    assert s["speedup_long_answers"] == 5.0  # the long-answer question alone: 100 ms vs 20 ms
    assert s["decode_tokens_per_s"] == 200.0  # 2 decode tokens (the first comes from prefill) in 10 ms
    report = {"results": {BASELINE: summarize(base, base["runs"]), "onnxruntime": s,
                          "tensorrt": {"skipped": "TensorRT is not installed here"}}}
    table = format_table(report).splitlines()
    assert all(title in table[0] for _, title, _ in COLUMNS)
    assert table[2].startswith("onnxruntime") and "5.00x" in table[2] and "1/2" in table[2]
    assert "(TensorRT is not installed here)" in table[3]


def test_bench_cli_quick_run(tiny_qwen2vl_dir, tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    rc = cli_main(["bench", "--model", str(tiny_qwen2vl_dir), "--backends", "torch,onnxruntime,tensorrt",
                   "--questions", "2", "--max-new-tokens", "4", "--threads", "1",
                   "--onnx", str(export_once(tiny_qwen2vl_dir)), "--json", str(out_json), "--max-load", "0"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    table = captured.out
    for _, title, _ in COLUMNS:
        assert title in table
    for name in (BASELINE, "torch", "onnxruntime", "tensorrt"):
        assert name in table
    report = json.loads(out_json.read_text())
    results = report["results"]
    for name in (BASELINE, "torch", "onnxruntime"):
        r = results[name]
        assert "error" not in r, r
        for key in ("total_ms_mean", "total_ms_p50", "total_ms_p90", "peak_rss_mb", "load_s", "tokens_mean",
                    "questions"):
            assert r[key] is not None and r[key] >= 0, (name, key)
        assert r["questions"] == 2
        assert len(report["raw"][name]["runs"]) == 2
    for name in ("torch", "onnxruntime"):
        r = results[name]
        # --max-load 0: any load is too much, so the ratio is kept aside, not printed as a figure
        for key in ("vision_ms_p50", "prefill_ms_p50", "decode_tokens_per_s", "speedup_vs_generate_under_load",
                    "speedup_long_answers_under_load", "same_tokens_as_generate"):
            assert key in r, (name, key)
        assert "speedup_vs_generate" not in r and "speedup_long_answers" not in r
        assert r["same_tokens_as_generate"] == 2  # greedy: identical answers to generate
    assert results["onnxruntime"]["torch_imported"] is False  # measured without the PyTorch model
    # the decode bound of each CPU row: ONNX Runtime reads its decoder file's bytes per token
    bytes_per_token = report["decode_bound"]["bytes_per_token"]
    assert bytes_per_token["onnxruntime"] > 0 and bytes_per_token["torch"] > 0
    assert all(results[name]["decode_bound_tok_s"] > 0 for name in ("torch", "onnxruntime"))
    assert results["torch"]["torch_imported"] is True
    if not tensorrt_available():
        assert "skipped" in results["tensorrt"]
    assert report["config"]["max_new_tokens"] == 4
    assert report["machine"]["busy"] is True and any("busy" in note for note in report["notes"])
    assert "ratios are not printed" in captured.out


def test_bench_runs_a_qwen3vl_model(tiny_qwen3vl_dir, tmp_path, capsys):
    """Qwen3-VL through `vlsi bench`: torch and onnxruntime (its export carries DeepStack) give
    generate's tokens on every question."""
    out_json = tmp_path / "bench.json"
    rc = cli_main(["bench", "--model", str(tiny_qwen3vl_dir), "--backends", "torch,onnxruntime", "--questions", "2",
                   "--max-new-tokens", "4", "--threads", "1", "--onnx", str(export_once(tiny_qwen3vl_dir)),
                   "--json", str(out_json), "--max-load", "0"])
    assert rc == 0, capsys.readouterr().err
    results = json.loads(out_json.read_text())["results"]
    for name in ("torch", "onnxruntime"):
        assert "error" not in results[name] and results[name]["same_tokens_as_generate"] == 2, results[name]


def test_bench_cli_rejects_unknown_backend():
    with pytest.raises(SystemExit):
        cli_main(["bench", "--backends", "torch,jax"])


def test_rounds_are_merged():
    from vlsi_model.bench import _merge_rounds

    a = {"load_s": 1.0, "peak_rss_mb": 100.0, "torch_imported": False, "threads": 1, "runs": [{"total_ms": 1.0}]}
    b = {"load_s": 3.0, "peak_rss_mb": 150.0, "torch_imported": True, "threads": 1, "runs": [{"total_ms": 2.0}]}
    merged = _merge_rounds([a, b])
    assert merged["runs"] == [{"total_ms": 1.0}, {"total_ms": 2.0}] and merged["rounds"] == 2
    assert merged["load_s"] == 2.0 and merged["peak_rss_mb"] == 150.0 and merged["torch_imported"] is True
    assert _merge_rounds([a, {"error": "boom"}]) == {"error": "boom"}


def test_load_gate_and_long_answers():
    from vlsi_model.bench import LONG_ANSWER_QUESTIONS, bench_inputs, load_too_high

    assert not load_too_high([0.1, 0.3], max_load=0.5) and load_too_high([0.1, 0.6], max_load=0.5)
    assert load_too_high([], max_load=0.0) and load_too_high([0.0], max_load=0.0)  # 0: never print a ratio
    questions = [q for _, q in bench_inputs(6)]
    assert questions[1::2] == [LONG_ANSWER_QUESTIONS[k % 2] for k in range(3)]
    assert "Where is each object?" not in {q for _, q in bench_inputs(6, long_answers=False)}


def test_the_shipped_student_answers_the_long_questions_at_length():
    """The bench's long questions on its frames (the demo camera's grid scenes) get lists of
    objects from the shipped student, so a benchmark measures decode and not only the prefill."""
    from vlsi_model.bench import bench_inputs
    from vlsi_model.defaults import default_model_path
    from vlsi_model.engine import load_engine

    engine = load_engine(default_model_path(), backend="torch")
    lengths = [len(engine.answer(image, question, 64).token_ids) for image, question in bench_inputs(16)[1::2]]
    assert max(lengths) >= 30 and sum(lengths) / len(lengths) >= 12, lengths  # 16.5 on average (was 3 on
    # the random-layout scenes the bench used before)


def test_busy_gate_bounds_scale_with_this_process_cpus(monkeypatch):
    """The default bounds follow the CPUs this process may use (a container's cpuset), and without
    /proc/stat the gate falls back to the load average instead of switching itself off."""
    from vlsi_model import bench

    monkeypatch.setattr(bench, "usable_cpus", lambda: [0, 1])
    assert not bench.load_too_high([0.4], None) and bench.load_too_high([0.5], None)  # 0.25 x 2 cores
    assert not bench.load_too_high([], None, loads=[1.4]) and bench.load_too_high([], None, loads=[1.6])
    monkeypatch.setattr(bench, "usable_cpus", lambda: list(range(8)))
    assert not bench.load_too_high([1.9], None) and bench.load_too_high([2.0], None)
    # others = busy seconds of the CPU set minus the bench's own, per second of wall time
    assert bench.others_cores(busy_s=5.0, own_s=3.0, wall_s=4.0) == 0.5
    assert bench.others_cores(busy_s=2.9, own_s=3.0, wall_s=1.0) == 0.0


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="CPU accounting reads Linux's /proc/stat")
def test_other_processes_cpu_is_measured_apart_from_the_bench_itself():
    """The busy gate counts what other processes took while a worker measured, not the load average
    (which counts the worker's own threads): a worker that keeps its cores busy is not "others"."""
    import subprocess
    import sys

    from vlsi_model.bench import _busy_cpu_seconds, _own_cpu_seconds

    busy0, own0 = _busy_cpu_seconds(), _own_cpu_seconds()
    subprocess.run([sys.executable, "-c", "x = 0\nfor i in range(3_000_000): x += i"], check=True)
    busy1, own1 = _busy_cpu_seconds(), _own_cpu_seconds()
    assert own1 - own0 > 0.05  # the child's CPU is ours
    assert busy1 - busy0 >= (own1 - own0) * 0.8  # and the machine saw it



def test_dims_builds_a_real_size_model_once_and_bounds_decode_by_bandwidth(tmp_path, monkeypatch, capsys):
    """`vlsi bench --dims SIZE` measures a random-weight model at real dimensions, built locally once
    (no download) and reused; every CPU row gets its decode bound (bandwidth / weight bytes per token)."""
    from vlsi_model.real_size import decode_weight_bytes, real_size_model_dir

    monkeypatch.setenv("VLSI_REAL_SIZE_CACHE", str(tmp_path / "cache"))
    out_json = tmp_path / "bench.json"
    rc = cli_main(["bench", "--dims", "tiny", "--backends", "torch", "--questions", "2", "--max-new-tokens", "4",
                   "--threads", "1", "--max-load", "0", "--json", str(out_json)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    model_dir = tmp_path / "cache" / "tiny_qwen2_vl"
    assert json.loads((model_dir / "vlsi_model.json").read_text())["random_weights"] is True
    assert "of bound" in captured.out and "decode bound: memory read bandwidth" in captured.out
    report = json.loads(out_json.read_text())
    bound = report["decode_bound"]
    assert bound["bandwidth_gbs"] > 0
    config = json.loads((model_dir / "config.json").read_text())
    assert bound["bytes_per_token"]["torch"] == decode_weight_bytes(config)
    torch_row = report["results"]["torch"]
    assert torch_row["of_decode_bound"] == pytest.approx(
        torch_row["decode_tokens_per_s"] / (bound["bandwidth_gbs"] * 1e9 / decode_weight_bytes(config)), rel=1e-2)
    # reused, not rebuilt
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert real_size_model_dir("tiny") == model_dir and (model_dir / "model.safetensors").stat().st_mtime_ns == stamp
    # built from other dimensions (its recorded config hash differs): rebuilt, not measured
    meta = json.loads((model_dir / "vlsi_model.json").read_text())
    (model_dir / "vlsi_model.json").write_text(json.dumps({**meta, "config_sha256": "other"}))
    assert real_size_model_dir("tiny") == model_dir
    assert json.loads((model_dir / "vlsi_model.json").read_text())["config_sha256"] == meta["config_sha256"]


def test_decode_bytes_are_the_decoder_and_head_weights(tiny_qwen2vl_dir):
    """What one decode step reads: decoder layers + final norm + LM head, as the built model counts them."""
    from vlsi_model.checkpoint import load_model_dir
    from vlsi_model.distill.adapters import get_adapter
    from vlsi_model.real_size import decode_weight_bytes

    model, _, _ = load_model_dir(tiny_qwen2vl_dir)
    adapter = get_adapter(model)
    counted = sum(p.numel() for m in (adapter.decoder_layers(model), adapter.final_norm(model), adapter.lm_head(model))
                  for p in m.parameters())
    assert decode_weight_bytes(json.loads((tiny_qwen2vl_dir / "config.json").read_text())) == 4 * counted


def test_available_memory_stays_inside_the_containers_cgroup_limit(tmp_path, monkeypatch):
    from vlsi_model import real_size

    monkeypatch.setattr(real_size, "CGROUP_DIR", tmp_path)
    host = real_size.available_memory()  # no cgroup files: the host's MemAvailable
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory.current").write_text("1000\n")
    assert abs(real_size.available_memory() - host) < (256 << 20)
    (tmp_path / "memory.max").write_text(f"{1 << 30}\n")
    (tmp_path / "memory.current").write_text(f"{1 << 28}\n")
    assert real_size.available_memory() == min(host, (1 << 30) - (1 << 28))


def test_sizes_that_do_not_fit_are_refused_with_the_numbers(capsys):
    from vlsi_model.real_size import check_fits, fp32_bytes, resolve

    assert resolve("Qwen2-VL-7B") == resolve("qwen2_vl_7b") == "7b"
    assert 8.2e9 * 4 < fp32_bytes("7b") < 8.4e9 * 4  # Qwen2-VL-7B: 8.29B parameters
    with pytest.raises(ValueError, match=r"qwen2_vl_7b needs ~38\.6 GB of RAM in fp32; 16\.0 GB are available"):
        check_fits("7b", available_bytes=16 << 30)
    check_fits("tiny", available_bytes=1)
    assert cli_main(["bench", "--dims", "13b"]) == 2 and "unknown model size" in capsys.readouterr().err
    assert cli_main(["bench", "--dims", "tiny", "--model", "x"]) == 2
