from prunekit.cli import main


def test_list_shows_every_method(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("tops", "visionzip", "cdpruner", "sparsevlm", "dpp", "vision_features"):
        assert name in out


def test_demo_reports_an_unreachable_budget_without_a_traceback(capsys):
    assert main(["demo", "--method", "fastv", "--keep-tokens", "64", "--repeats", "1", "--new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert "out of reach" in err and "Traceback" not in err


def test_demo_rejects_an_unknown_method(capsys):
    assert main(["demo", "--method", "nope", "--repeats", "1"]) == 2
    assert "nope" in capsys.readouterr().err
