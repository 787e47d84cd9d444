import pytest

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
                 "--budget-meaning", "layer_average", "--batch", "1", "2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["batches"] == [1, 2]
    assert {(r["n"], r["batch"]) for r in result["selection"]} == {(64, 1), (64, 2), (256, 1), (256, 2)}
    assert all(r["identical"] for r in result["selection"])  # the incremental greedy equals the naive loop
    for batch in (1, 2):
        rows = {(r["method"], r["keep_tokens"]): r for r in result["model"] if r["batch"] == batch}
        base, tops = rows[("unpruned", None)], rows[("tops", 6)]
        assert base["flops"] > tops["flops"] > 0
        assert tops["ideal_speedup"] == base["flops_scaled"] / tops["flops_scaled"]
        assert tops["tokens_layer_average"] == 6.0 and tops["decode_ms"] > 0
        assert rows[("visionzip", 6)]["tokens_layer_average"] == 6.0 and rows[("visionzip", 6)]["speedup"] > 0
        assert "out of reach" in rows[("fastv", 6)]["error"]  # an unreachable budget is a row that says why
        oracle = rows[("oracle", 6)]  # the unpatched model on 6 visual tokens: the hardware's best at that budget
        assert base["flops"] > oracle["flops"] and oracle["speedup"] > 0
        assert any(f"TOPS prefill <= VisionZip + 5%, T=6 (layer_average), batch {batch}" in t["target"]
                   for t in result["targets"])
    flops = {r["batch"]: r["flops"] for r in result["model"] if r["method"] == "unpruned"}
    # two prompts of the same length: twice the work, but for what a forward computes once whatever the batch (the
    # rotary table from shared position ids on some transformers releases: 2,080 FLOPs of 123 M on 5.16)
    assert abs(flops[2] - 2 * flops[1]) <= 1e-4 * flops[2], flops
    # the tiny model is at its full depth: nothing is scaled, measured = scaled
    assert all(r["prefill_ms"] == r["prefill_ms_scaled"] for r in result["model"] if r["error"] is None)
    assert "not scaled" in result["scaling"]
    assert (tmp_path / "selection_time.png").stat().st_size > 0
    assert list(tmp_path.glob("speedup_*.png"))
    out = capsys.readouterr().out
    assert "| model | batch | method | budget T (layer_average) | tokens (layer avg) |" in out
    assert "| N | K | batch |" in out and "selection / prefill" in out
    assert result["budget_meaning"] == "layer_average"


def test_bench_rejects_mismatched_sizes(capsys):
    assert main(["bench", "--parts", "selection", "--n", "64", "128", "--k", "8", "--no-progress"]) == 2
    assert "--n and --k" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "--batch must be one or more integers >= 1"),
    (["--repeats", "0"], "--repeats must be an integer >= 1"),
    (["--new-tokens", "0"], "--new-tokens must be an integer >= 1"),
    (["--parts", "model", "--model", "7b", "--decoder-layers", "40"], "--decoder-layers must be an integer in 1..32"),
    (["--parts", "model", "--model", "7b", "--vision-layers", "0"], "--vision-layers must be an integer in 1..24"),
    (["--parts", "selection", "--n", "64", "--k", "65"], "--k must be in 1..N"),
    (["--parts", "model", "--budgets", "0"], "--budgets must be integers >= 1"),
])
def test_bench_rejects_bad_options_naming_them(tmp_path, capsys, argv, message):
    assert main(["bench", "--no-progress", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bench_rejects_an_unknown_selection_prefill_listing_the_choices(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--selection-prefill", "full"])
    err = capsys.readouterr().err
    assert "--selection-prefill" in err and all(c in err for c in ("auto", "decoder", "layer", "none"))


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
