"""Command line for dynamic trees on the default model (slow: loads SmolLM2-135M)."""

from __future__ import annotations

import pytest

from dyntree.cli import main


@pytest.mark.slow
def test_generate_dynamic_matches_plain_decoding(capsys):
    code = main(["generate", "--heads", "random", "--tree", "dynamic", "--tree-size", "12", "--topk", "4",
                 "--tree-score", "binned", "--prompt", "Name three colours.", "--max-new-tokens", "12", "--compare"])
    err = capsys.readouterr().err
    assert code == 0
    assert "identical output: yes" in err
    code = main(["generate", "--lookup", "4", "--prompt", "Repeat after me: red, green, blue; red, green, blue.",
                 "--max-new-tokens", "24", "--compare"])
    err = capsys.readouterr().err
    assert code == 0 and "identical output: yes" in err and "lookup4" in err


@pytest.mark.slow
def test_viz_writes_pngs_and_rejects_bad_input(tmp_path, capsys):
    out = tmp_path / "trees"
    code = main(["viz", "--heads", "random", "--tree-size", "10", "--prompt", "Say hello.", "--steps", "1,2",
                 "--max-new-tokens", "8", "--out", str(out)])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["step-001.png", "step-002.png"]
    capsys.readouterr()
    assert main(["viz", "--heads", "random", "--prompt", "x", "--steps", "zero", "--out", str(out)]) == 2
    assert main(["generate", "--heads", "random", "--tree", "dynamic", "--tree-size", "1", "--prompt", "x"]) == 2
    assert main(["generate", "--heads", "random", "--tree", "static:8", "--tree-size", "8", "--prompt", "x"]) == 2
    assert main(["generate", "--heads", "random", "--tree", "ar", "--topk", "4", "--prompt", "x"]) == 2
    assert main(["generate", "--heads", "random", "--tree", "static", "--lookup", "4", "--prompt", "x"]) == 2
    assert main(["generate", "--heads", "random", "--lookup", "-1", "--prompt", "x"]) == 2
    assert main(["generate", "--heads", "random", "--tree", "static:99", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 7
