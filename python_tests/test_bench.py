"""Smoke tests of the benchmark scripts: tiny presets, JSON structure and values (a few seconds)."""
import importlib
import json
import math
import pathlib
import sys

import pytest
import torch

import lightkv_ext.api

BENCH_DIR = pathlib.Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench_modules():
    """Import the scripts as modules; they import their shared helpers as `_timing`."""
    sys.path.insert(0, str(BENCH_DIR))
    try:
        yield {name: importlib.import_module(name)
               for name in ("_timing", "bench_kernels", "bench_quality", "kernel_breakdown", "compare_builds")}
    finally:
        sys.path.remove(str(BENCH_DIR))


def is_png(path: pathlib.Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quantiles_interpolate_linearly(bench_modules):
    timing = bench_modules["_timing"]
    summary = timing.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (summary.median_us, summary.p20_us, summary.p80_us, summary.repetitions) == (3.0, 1.8, 4.2, 5)
    with pytest.raises(ValueError, match="values"):
        timing.quantile([], 0.5)


def run_kernel_bench(bench_modules, tmp_path, device):
    json_path, plot_path = tmp_path / "kernels.json", tmp_path / "kernels.png"
    result = bench_modules["bench_kernels"].main(
        ["--quick", "--presets", "tiny", "tiny_varlen", "--batches", "1", "2", "--device", device,
         "--json", str(json_path), "--plot", str(plot_path)])
    written = json.loads(json_path.read_text())
    assert written == json.loads(json.dumps(result)) and written["complete"] is True
    assert [path.name for path in tmp_path.iterdir() if path.suffix == ".partial"] == []
    if importlib.util.find_spec("matplotlib") is not None:
        assert is_png(plot_path)
    return written


def test_kernel_bench_keeps_the_rows_of_a_cut_run(bench_modules, tmp_path, monkeypatch):
    """A run stopped after its first case (a device call's time limit) leaves that case's rows."""
    bench = bench_modules["bench_kernels"]
    measure = bench.benchmark_case
    calls = []

    def stop_at_the_second_case(*args, **kwargs):
        calls.append(args[0].preset.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return measure(*args, **kwargs)

    monkeypatch.setattr(bench, "benchmark_case", stop_at_the_second_case)
    json_path = tmp_path / "cut.json"
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--quick", "--presets", "tiny", "tiny_varlen", "--device", "cpu", "--json", str(json_path)])
    written = json.loads(json_path.read_text())
    assert written["complete"] is False
    assert {(row["preset"], row["batch"]) for row in written["rows"]} == {("tiny", 1)}


def check_kernel_rows(data, expected_backends):
    assert isinstance(data["device"], str) and data["device"]
    assert data["torch"] == torch.__version__
    rows = data["rows"]
    cases = sorted({(row["preset"], row["batch"]) for row in rows})
    assert cases == [("tiny", 1), ("tiny", 2), ("tiny_varlen", 1), ("tiny_varlen", 2)]
    for preset, batch in cases:
        case_rows = [row for row in rows if (row["preset"], row["batch"]) == (preset, batch)]
        assert [row["backend"] for row in case_rows] == expected_backends
        by_backend = {row["backend"]: row for row in case_rows}
        # Ratio 0.5 on 2x2 windows: 8x8 keeps 4 x 8 of 64 tokens, 6x10 keeps 4 x 8 of 60 (windows of 15).
        tokens_per_prompt = {"tiny": 64, "tiny_varlen": 124}[preset]
        assert by_backend["reference"]["vision_tokens"] == tokens_per_prompt * batch
        assert by_backend["reference"]["kept_tokens"] == {"tiny": 32, "tiny_varlen": 64}[preset] * batch
        compiled = by_backend["reference_compiled"]
        assert compiled["status"] == "skipped" and "--quick" in compiled["reason"]
        assert "median_us" not in compiled
        assert by_backend["lightkv_ext"]["matches_reference"] is True
        reference_us = by_backend["reference"]["median_us"]
        for row in case_rows:
            if row["status"] != "ok":
                continue
            assert 0 < row["p20_us"] <= row["median_us"] <= row["p80_us"]
            assert math.isclose(row["speedup_vs_reference"], reference_us / row["median_us"])
            assert math.isclose(row["gbps"], row["bytes"] / row["median_us"] / 1e3)
        assert by_backend["reference"]["speedup_vs_reference"] == 1.0


def test_kernel_bench_cpu(bench_modules, tmp_path):
    data = run_kernel_bench(bench_modules, tmp_path, "cpu")
    check_kernel_rows(data, ["reference", "reference_compiled", "lightkv_ext"])
    for row in data["rows"]:
        assert row["dtype"] == "float32" and row["roofline_fraction"] is None


def test_replot_draws_saved_rows_without_measuring(bench_modules, tmp_path):
    bench = bench_modules["bench_kernels"]
    saved = {"device": "cpu", "rows": [
        {"preset": "tiny", "backend": backend, "vision_tokens": tokens, "median_us": us, "status": "ok"}
        for backend, tokens, us in [("reference", 64, 90.0), ("reference", 128, 170.0), ("lightkv_ext", 64, 9.0)]]}
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(dict(saved, rows=saved["rows"][:2])))
    second.write_text(json.dumps(dict(saved, rows=saved["rows"][2:])))
    plot_path = tmp_path / "replot.png"
    result = bench.main(["--replot", str(first), str(second), "--plot", str(plot_path)])
    assert result["rows"] == saved["rows"]
    if importlib.util.find_spec("matplotlib") is not None:
        assert is_png(plot_path)
    with pytest.raises(SystemExit, match="--plot"):
        bench.main(["--replot", str(first)])
    second.write_text(json.dumps(dict(saved, device="other")))
    with pytest.raises(SystemExit, match="different devices"):
        bench.main(["--replot", str(first), str(second), "--plot", str(plot_path)])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernel_bench_cuda(bench_modules, tmp_path):
    data = run_kernel_bench(bench_modules, tmp_path, "cuda")
    check_kernel_rows(data, ["reference", "reference_compiled", "lightkv_ext", "lightkv_ext_chained", "lightkv_ext_graph",
                             "lightkv_ext_graph_chained", "lightkv_ext_graph_one_stream",
                             "lightkv_ext_graph_one_pass", "lightkv_ext_graph_two_passes",
                             "lightkv_ext_graph_unfused_groups", "lightkv_ext_graph_float64_dots",
                             "copy_roofline"])
    for row in data["rows"]:
        assert row["dtype"] == "float16"
        if row["status"] == "ok":
            assert row["host_us"] > 0
        if row["backend"] == "copy_roofline":
            assert row["roofline_fraction"] == 1.0
        elif row["status"] == "ok":
            assert row["roofline_fraction"] > 0
        if row["backend"].startswith("lightkv_ext_graph"):  # dense and varlen (host offsets) alike
            assert row["status"] == "ok" and row["matches_reference"] is True, row


@pytest.mark.parametrize("merge_mode", ["auto", "screened"])
def test_kernel_breakdown_cpu(bench_modules, tmp_path, merge_mode):
    breakdown = bench_modules["kernel_breakdown"]
    json_path = tmp_path / "breakdown.json"
    result = breakdown.main(["--cases", "tiny:1", "tiny_varlen:2", "--device", "cpu", "--calls", "2",
                             "--merge-mode", merge_mode, "--json", str(json_path)])
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(result))
    assert result["merge_mode"] == merge_mode
    assert [(case["preset"], case["batch"], case["vision_tokens"]) for case in result["cases"]] == [
        ("tiny", 1, 64), ("tiny_varlen", 2, 248)]
    for case in result["cases"]:  # dense and varlen alike: one score and one merge per call
        rows = {row["name"]: row for row in case["rows"]}
        assert set(rows) == {"lightkv::score", "lightkv::merge"}
        assert all(row["count_per_call"] == 1.0 and row["us_per_call"] > 0 for row in rows.values())
        assert math.isclose(sum(row["share"] for row in rows.values()), 1.0)


@pytest.mark.parametrize("flag", ["--ncu-range", "--timeline"])
def test_kernel_breakdown_cuda_only_modes_need_cuda(bench_modules, flag):
    with pytest.raises(SystemExit, match=f"{flag}: needs a CUDA device"):
        bench_modules["kernel_breakdown"].main([flag, "--cases", "tiny:1", "--device", "cpu"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernel_breakdown_ncu_range_cuda(bench_modules):
    """Outside ncu the profiler range is a no-op: the calls just run."""
    result = bench_modules["kernel_breakdown"].main(["--ncu-range", "--cases", "tiny:1", "tiny_varlen:2"])
    assert [(case["preset"], case["batch"]) for case in result["cases"]] == [("tiny", 1), ("tiny_varlen", 2)]


def test_kernel_breakdown_timeline_rows_take_the_last_replay(bench_modules):
    """Two replays of two streams: the second replay's kernels, relative to its first start, with
    the idle time on each stream before each kernel."""
    def kernel(name, ts, dur, stream):
        return {"cat": "kernel", "name": f"void {name}<float>(Params)", "ts": ts, "dur": dur, "tid": stream,
                "args": {"stream": stream}}

    replay = [("a_kernel", 0.0, 5.0, 7), ("b_kernel", 1.0, 2.0, 13), ("c_kernel", 6.0, 1.5, 13),
              ("d_kernel", 9.0, 1.0, 7)]
    events = [{"cat": "cpu_op", "name": "aten::empty", "ts": 0.0, "dur": 1.0}]
    events += [kernel(name, 100.0 + ts, dur, stream) for name, ts, dur, stream in replay]
    events += [kernel(name, 500.0 + ts, dur, stream) for name, ts, dur, stream in reversed(replay)]
    rows = bench_modules["kernel_breakdown"].timeline_rows(events, replays=2)
    assert [(row["name"], row["stream"], row["start_us"], row["end_us"], row["idle_before_us"]) for row in rows] == [
        ("a_kernel", 7, 0.0, 5.0, None), ("b_kernel", 13, 1.0, 3.0, None), ("c_kernel", 13, 6.0, 7.5, 3.0),
        ("d_kernel", 7, 9.0, 10.0, 4.0)]
    with pytest.raises(ValueError, match="same GPU activities in each of 3 replays"):
        bench_modules["kernel_breakdown"].timeline_rows(events, replays=3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernel_breakdown_timeline_cuda(bench_modules):
    """A graph replay's kernels, in start order within the span, dense and varlen."""
    result = bench_modules["kernel_breakdown"].main(["--timeline", "--cases", "tiny:1", "tiny_varlen:1",
                                                     "--calls", "2"])
    assert [(case["preset"], case["batch"]) for case in result["cases"]] == [("tiny", 1), ("tiny_varlen", 1)]
    for case in result["cases"]:
        rows = case["timeline"]
        assert any(row["name"] == "merge_values_kernel" for row in rows)
        starts = [row["start_us"] for row in rows]
        assert starts[0] == 0.0 and starts == sorted(starts)
        assert all(row["end_us"] >= row["start_us"] for row in rows)


def test_kernel_breakdown_names_and_cases(bench_modules):
    breakdown = bench_modules["kernel_breakdown"]
    signature = ("void lightkv_cuda::(anonymous namespace)::merge_values_kernel<__nv_bfloat16, 8>"
                 "(lightkv_cuda::(anonymous namespace)::ValueParams)")
    assert breakdown.short_name(signature) == "merge_values_kernel"
    assert breakdown.short_name("Memset (Device)") == "Memset (Device)"
    assert breakdown.parse_case("llava15:32") == ("llava15", 32)
    layout_args = (((4, 4),), ((2, 2),), 0.5, torch.device("cpu"))
    with breakdown.loose_window_bound():  # only while active, and the cached layout stays true
        assert lightkv_ext.api.full_grid_layout(*layout_args).max_window == 2**40
    assert lightkv_ext.api.full_grid_layout(*layout_args).max_window == 4
    for bad in ("llava15", "nope:1", "llava15:0", "llava15:x"):
        with pytest.raises(Exception, match="PRESET:BATCH"):
            breakdown.parse_case(bad)


def test_compare_builds_finds_identical_and_changed_outputs(bench_modules, tmp_path, capsys):
    compare_builds = bench_modules["compare_builds"]
    first, second = tmp_path / "first.pt", tmp_path / "second.pt"
    for path in (first, second):
        assert compare_builds.main(["--save", str(path), "--cases", "tiny:2", "tiny_varlen:1", "--device", "cpu"]) == 0
    assert compare_builds.main(["--compare", str(first), str(second)]) == 0
    assert "tiny:2: identical (k, v, sizes, index, assignment, importance)" in capsys.readouterr().out
    saved = torch.load(second)
    saved["results"]["tiny_varlen:1"]["importance"][0] += 1e-6  # a last-bit change is a difference
    torch.save(saved, second)
    assert compare_builds.main(["--compare", str(first), str(second)]) == 1
    assert "tiny_varlen:1: differ in importance" in capsys.readouterr().out


def test_quality_bench(bench_modules, tmp_path):
    pytest.importorskip("skimage", reason="bench_quality needs scikit-image's sample photographs")
    quality = bench_modules["bench_quality"]
    json_path, plot_path = tmp_path / "quality.json", tmp_path / "quality.png"
    arguments = ["--images", "astronaut", "--prompts", "1", "--json", str(json_path)]
    result = quality.main(arguments + ["--plot", str(plot_path)])
    data = json.loads(json_path.read_text())
    assert data == json.loads(json.dumps(result))
    if importlib.util.find_spec("matplotlib") is not None:
        assert is_png(plot_path)

    assert data["kept_ratio"] == 0.5
    assert set(data["methods"]) == {"lightkv", "vision_only_merge", "attention_topk", "random_drop"}
    table = data["table"]
    # 4 methods at 3 kept ratios + pool2x2 at 0.25, each with and without proportional attention.
    assert len(table) == (4 * 3 + 1) * 2
    assert {row["kept_ratio"] for row in table if row["method"] == "pool2x2"} == {0.25}
    for row in table:
        assert row["trials"] == 1
        assert 0 <= row["rel_l2_mean"] < 2 and -1 <= row["cosine_mean"] <= 1
    headline = {row["method"]: row["rel_l2_mean"] for row in table
                if row["kept_ratio"] == 0.5 and row["proportional"]}
    assert data["methods"] == headline
    # Uniform sizes (1 after dropping, 4 after pooling) shift all logits equally: no change.
    for method in ("attention_topk", "random_drop", "pool2x2"):
        errors = {row["proportional"]: row["rel_l2_mean"] for row in table
                  if row["method"] == method and row["kept_ratio"] == 0.25}
        assert errors[True] == pytest.approx(errors[False], rel=1e-5)
    # On this prompt the merge's error falls as more tokens are kept.
    lightkv = {row["kept_ratio"]: row["rel_l2_mean"] for row in table
               if row["method"] == "lightkv" and row["proportional"]}
    assert lightkv[0.25] > lightkv[0.5] > lightkv[0.75] > 0

    # Deterministic seeds: a second run reproduces the table exactly.
    assert quality.main(arguments)["table"] == result["table"]
