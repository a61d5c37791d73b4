"""The CLI: bad input gives one clear line and exit code 2; a tiny local model generates and compares."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import backbone_from_hf, tiny_hf_model
from dyntree.cli import main
from dyntree.heads import MedusaHeads


def run_cli(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code, err, fragment):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err


def test_generate_and_compare_on_a_local_model(capsys, tiny_model_dir, tmp_path):
    MedusaHeads.random(backbone_from_hf(tiny_hf_model()).config, num_heads=4).save(tmp_path / "heads")
    code, out, err = run_cli(capsys, "generate", "--model", str(tiny_model_dir), "--heads", str(tmp_path / "heads"),
                             "--prompt", "w5 w6 w7", "--max-new-tokens", "12", "--compare")
    assert code == 0, err
    assert len(out.split()) >= 1
    assert "identical output: yes" in err and "accepted" not in out


@pytest.mark.parametrize("case", ["unknown_model", "empty_prompt", "broken_tree", "missing_tree", "foreign_heads",
                                  "corrupt_heads", "too_long_prompt", "not_a_model_dir"])
def test_bad_input_is_one_clear_line(capsys, tiny_model_dir, tmp_path, case):
    model = ["--model", str(tiny_model_dir)]
    heads_dir = tmp_path / "heads"
    MedusaHeads.random(backbone_from_hf(tiny_hf_model()).config, num_heads=4).save(heads_dir)
    args = {
        "unknown_model": (["--model", "no-such-model", "--prompt", "hi"], "unknown model"),
        "not_a_model_dir": (["--model", str(tmp_path), "--prompt", "hi"], "not a Hugging Face model directory"),
        "empty_prompt": (model + ["--prompt", "   "], "empty prompt"),
        "broken_tree": (model + ["--heads", str(heads_dir), "--prompt", "w5", "--tree", str(tmp_path / "t.json")],
                        "not valid JSON"),
        "missing_tree": (model + ["--heads", str(heads_dir), "--prompt", "w5", "--tree", "nope.json"],
                         "unknown tree"),
        "foreign_heads": (model + ["--heads", str(tmp_path / "other"), "--prompt", "w5"], "do not fit"),
        "corrupt_heads": (model + ["--heads", str(heads_dir), "--prompt", "w5"], "corrupt heads checkpoint"),
        "too_long_prompt": (model + ["--prompt", "w5 " * 600], "the model's context is 512"),
    }[case]
    (tmp_path / "t.json").write_text("[[0], [0")
    other = backbone_from_hf(tiny_hf_model(hidden_size=32, num_attention_heads=2, num_key_value_heads=1))
    MedusaHeads.random(other.config).save(tmp_path / "other")
    if case == "corrupt_heads":
        (heads_dir / "heads.safetensors").write_bytes(b"garbage")
    code, out, err = run_cli(capsys, "generate", *args[0])
    assert_one_line_error(code, err, args[1])
    assert out == ""  # nothing half-written


def test_exit_code_from_a_real_process():
    proc = subprocess.run([sys.executable, "-m", "dyntree.cli", "generate", "--model", "/nonexistent", "--prompt",
                           "hi"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown model '/nonexistent': not 'default' and no such directory"
