from prunekit.tools.cli import main


def test_list_shows_every_method(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("tops", "visionzip", "cdpruner", "sparsevlm", "dpp", "vision_features"):
        assert name in out


def test_demo_reports_an_unreachable_budget_without_a_traceback(capsys):
    assert main(["demo", "--model", "random", "--method", "fastv", "--keep-tokens", "64", "--budget-meaning",
                 "layer_average", "--repeats", "1", "--new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert "out of reach" in err and "Traceback" not in err


def test_demo_rejects_an_unknown_method(capsys):
    assert main(["demo", "--model", "random", "--method", "nope", "--repeats", "1"]) == 2
    assert "nope" in capsys.readouterr().err


def test_bench_quick_writes_json_table_and_plots(tmp_path, capsys):
    import json

    assert main(["bench", "--quick", "--no-progress", "--methods", "tops", "visionzip", "fastv",
                 "--budget-meaning", "layer_average", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert {r["n"] for r in result["selection"]} == {64, 256}
    assert all(r["identical"] for r in result["selection"])  # the incremental greedy equals the naive loop
    rows = {(r["method"], r["keep_tokens"]): r for r in result["model"]}
    base, tops = rows[("unpruned", None)], rows[("tops", 6)]
    assert base["flops"] > tops["flops"] > 0 and tops["ideal_speedup"] == base["flops_scaled"] / tops["flops_scaled"]
    assert tops["tokens_layer_average"] == 6.0 and tops["decode_ms"] > 0
    assert "out of reach" in rows[("fastv", 6)]["error"]  # an unreachable budget is a row that says why
    oracle = rows[("oracle", 6)]  # the unpatched model on 6 visual tokens: the hardware's best at that budget
    assert base["flops"] > oracle["flops"] and oracle["speedup"] > 0
    assert any("TOPS prefill <= VisionZip" in t["target"] for t in result["targets"])
    assert (tmp_path / "selection_time.png").stat().st_size > 0
    assert list(tmp_path.glob("speedup_*.png"))
    out = capsys.readouterr().out
    assert "| model | method | T (layer_average) |" in out and "selection / prefill" in out
    assert result["budget_meaning"] == "layer_average"


def test_bench_rejects_mismatched_sizes(capsys):
    assert main(["bench", "--parts", "selection", "--n", "64", "128", "--k", "8", "--no-progress"]) == 2
    assert "--n and --k" in capsys.readouterr().err


def test_count_flops_is_exact_for_a_matmul():
    import torch

    from prunekit.tools.bench import count_flops

    a, b = torch.randn(3, 5), torch.randn(5, 7)
    assert count_flops(lambda: a @ b, {})["total"] == 2 * 3 * 5 * 7


def test_peak_memory_follows_tensor_allocations():
    import torch

    from prunekit.tools.bench import peak_memory_mib

    def work():
        a = torch.ones(1024, 1024)  # 4 MiB
        b = a * 2  # 4 MiB more while a is alive
        del a
        return b.sum()

    assert abs(peak_memory_mib(work, torch.device("cpu")) - 8.0) < 0.1
