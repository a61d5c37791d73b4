import json

import pytest

from dyntree.data import mt_bench_path
from dyntree.errors import DynTreeError
from dyntree.training.prompts import clean_self_prompt, interleave, read_prompt_file, user_turn_prefix

from training_support import FIXTURES, write_model_dir


def write(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_reads_every_supported_format(tmp_path):
    path = write(tmp_path, "mixed.jsonl", [
        {"turns": ["first turn", "second turn"]},
        {"question": "How many apples?"},
        {"instruction": "Sort these.", "instances": [{"input": "3 1 2", "output": "1 2 3"}, {"input": "b a"}]},
        {"instruction": "Write a poem.", "instances": [{"input": "", "output": "..."}]},
        "",
        {"prompt": "plain prompt"},
        {"text": "plain text"},
    ])
    texts = [p.text for p in read_prompt_file(path)]
    assert texts == ["first turn", "How many apples?", "Sort these.\n\n3 1 2", "Sort these.\n\nb a",
                     "Write a poem.", "plain prompt", "plain text"]


@pytest.mark.parametrize("rows, message", [
    (['{"prompt": "ok"}', "{not json"], "2: not valid JSON"),
    ([{"answer": "no prompt here"}], "1: no prompt field"),
    (["[1, 2]"], "expected a JSON object"),
    ([{"turns": []}], "turns"),
    ([{"prompt": 5}], "expected a string"),
    ([{"prompt": "   "}], "holds no prompts"),
    ([], "holds no prompts"),
])
def test_malformed_files_give_clear_errors(tmp_path, rows, message):
    with pytest.raises(DynTreeError, match=message):
        read_prompt_file(write(tmp_path, "bad.jsonl", rows))


def test_missing_file(tmp_path):
    with pytest.raises(DynTreeError, match="no prompt file"):
        read_prompt_file(tmp_path / "nope.jsonl")


def test_refuses_the_benchmark(tmp_path):
    rows = [{"question_id": 81, "category": "writing", "turns": ["a", "b"]}]
    with pytest.raises(DynTreeError, match="MT-Bench"):
        read_prompt_file(write(tmp_path, "questions.jsonl", rows))
    with pytest.raises(DynTreeError, match="MT-Bench"):
        read_prompt_file(write(tmp_path, "my_mt_bench.jsonl", [{"turns": ["x"]}]))


def test_refuses_the_packaged_benchmark_and_copies_of_it(tmp_path):
    with pytest.raises(DynTreeError, match="MT-Bench"):
        read_prompt_file(mt_bench_path())
    rows = [json.loads(line) for line in mt_bench_path().read_text().splitlines() if line.strip()]
    assert len(rows) == 80
    renamed = write(tmp_path, "questions.jsonl", rows)  # MT-Bench's fields under another name
    with pytest.raises(DynTreeError, match="MT-Bench"):
        read_prompt_file(renamed)
    converted = write(tmp_path, "chat.jsonl", [{"prompt": "an unrelated prompt"}, {"prompt": rows[5]["turns"][1]}])
    with pytest.raises(DynTreeError, match="1 MT-Bench question"):
        read_prompt_file(converted)


def test_training_prompt_sets_parse():
    gsm = read_prompt_file(FIXTURES / "gsm8k_train_questions.jsonl")
    seeds = read_prompt_file(FIXTURES / "self_instruct_seed_tasks.jsonl")
    assert len(gsm) == 4 and len(seeds) == 3
    mixed = interleave([gsm[:3], seeds[:2]])
    assert [p.source for p in mixed] == ["gsm8k_train_questions", "self_instruct_seed_tasks"] * 2 + [
        "gsm8k_train_questions"]


def test_interleave_deduplicates(tmp_path):
    a = read_prompt_file(write(tmp_path, "a.jsonl", [{"prompt": "x"}, {"prompt": "y"}]))
    b = read_prompt_file(write(tmp_path, "b.jsonl", [{"prompt": "x"}, {"prompt": "z"}]))
    assert [p.text for p in interleave([a, b])] == ["x", "y", "z"]


def test_self_prompt_filter():
    assert clean_self_prompt("  Explain how tides work on Earth.  ") == "Explain how tides work on Earth."
    assert clean_self_prompt("") is None
    assert clean_self_prompt("Hi") is None
    assert clean_self_prompt("the " * 40) is None
    assert clean_self_prompt("What is <|im_start|> doing here?") is None
    assert clean_self_prompt("x" * 2000 + " a b c") is None


def test_user_turn_prefix(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(write_model_dir(tmp_path / "m"))
    prefix = user_turn_prefix(tok)
    assert tok.convert_ids_to_tokens(prefix) == ["<|im_start|>", "user"]
    tok.chat_template = None
    with pytest.raises(DynTreeError, match="chat template"):
        user_turn_prefix(tok)
