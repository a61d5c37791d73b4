"""TreeConfig (one validated tree config), TextStream (one streaming-text helper) and the extras check."""

from __future__ import annotations

import sys

import pytest

from dyntree.config import AUTO_MAX_SIZE, DYNAMIC_SIZE, DYNAMIC_TOPK, STATIC_TOPK, TreeConfig
from dyntree.errors import DynTreeError
from dyntree.extras import require_extra
from dyntree.textstream import TextStream


# -- TreeConfig ------------------------------------------------------------------------------------------------
def test_parse_front_door_syntax():
    assert TreeConfig.parse() == TreeConfig(kind="dynamic")
    assert TreeConfig.parse("dynamic", "16") == TreeConfig(kind="dynamic", size=16)
    assert TreeConfig.parse("dynamic", "auto:24") == TreeConfig(kind="dynamic", size=24, auto=True)
    assert TreeConfig.parse("static:8") == TreeConfig(kind="static", size=8)
    assert TreeConfig.parse("mc_sim_7b_63:12").static_spec == "mc_sim_7b_63:12"
    assert TreeConfig.parse("static", 5).static_spec == "mc_sim_7b_63:5"
    assert TreeConfig.parse([[0], [0, 0]]).static_tree == [[0], [0, 0]]
    assert TreeConfig.parse("my_tree.json").static_tree == "my_tree.json"
    assert TreeConfig.parse("ar", None, topk=None, lookup=None) == TreeConfig(kind="ar")


def test_defaults_resolve_per_kind():
    dynamic, static, auto = TreeConfig.parse("dynamic"), TreeConfig.parse("static"), TreeConfig.parse("dynamic", "auto")
    assert (dynamic.resolved_topk, dynamic.resolved_size) == (DYNAMIC_TOPK, DYNAMIC_SIZE)
    assert dynamic.resolved_score == "prob"
    assert dynamic.resolved_tree_temperature == 2.0 and not dynamic.resolved_learn
    assert (static.resolved_topk, static.resolved_size) == (STATIC_TOPK, None)
    assert (auto.resolved_size, auto.resolved_score, auto.resolved_tree_temperature) == (AUTO_MAX_SIZE, "binned", 1.0)
    assert auto.resolved_learn
    assert TreeConfig.parse("ar").resolved_topk == 0 and TreeConfig.parse("ar").resolved_size == 1


@pytest.mark.parametrize("kwargs, words", [
    (dict(tree="beam"), None),  # not a kind, not a built-in name: a file that load_tree_spec will refuse
    (dict(tree=""), "tree must be"),
    (dict(tree="dynamic", tree_size=1), "at least 2"),
    (dict(tree="dynamic", tree_size="auto:1"), "at least 2"),
    (dict(tree="dynamic", tree_size="huge"), "'auto' or 'auto:N'"),
    (dict(tree="dynamic", tree_size=True), "'auto' or 'auto:N'"),
    (dict(tree="dynamic", topk=0), "topk"),
    (dict(tree="dynamic", score="magic"), "unknown tree score"),
    (dict(tree="dynamic", tree_temperature=0), "tree temperature"),
    (dict(tree="dynamic", lookup=-1), "lookup"),
    (dict(tree="dynamic", tree_size=8, latency="lat.json"), "only applies to tree size 'auto'"),
    (dict(tree="static", lookup=4), "lookup only applies to the dynamic tree"),
    (dict(tree="static", score="rank", lookup=2), "score, lookup only apply to the dynamic tree"),
    (dict(tree="static:8", tree_size=8), "already names its size"),
    (dict(tree="ar", topk=4), "plain decoding"),
    (dict(tree="dynamic", temperature=0.7), "unknown tree setting 'temperature'"),
])
def test_bad_settings_are_one_line_errors(kwargs, words):
    if words is None:
        assert TreeConfig.parse(**kwargs).kind == "static"
        return
    with pytest.raises(DynTreeError) as info:
        TreeConfig.parse(**kwargs)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_replace_keeps_settings_of_the_same_kind_only():
    base = TreeConfig.parse("dynamic", "auto:16", lookup=3, latency="lat.json")
    same = base.replace(tree="dynamic", lookup=0)
    assert same.auto and same.size == 16 and same.lookup == 0 and same.latency == "lat.json"
    fixed = base.replace(tree_size=8)
    assert not fixed.auto and fixed.size == 8 and fixed.latency is None and fixed.lookup == 3
    static = base.replace(tree="static", topk=4)
    assert static == TreeConfig(kind="static", topk=4)
    with pytest.raises(DynTreeError):
        base.replace(lookup=-2)  # every copy is validated too


def test_settings_record_resolved_values():
    assert TreeConfig.parse("dynamic").settings() == {"tree": "dynamic", "topk": 8, "size": 8, "score": "prob",
                                                      "tree_temperature": 2.0, "lookup": 6, "recycle": 2}
    assert TreeConfig.parse("static:8").settings() == {"tree": "static", "topk": 10, "static_tree": "mc_sim_7b_63",
                                                       "size": 8}
    auto = TreeConfig.parse("dynamic", "auto:12", latency="lat.json").settings()
    assert auto["size"] == "auto" and auto["max_size"] == 12 and auto["latency"] == "lat.json"


# -- TextStream ------------------------------------------------------------------------------------------------
class CharTokenizer:
    """Token i is the i-th piece; pieces may be half a character (bytes) to test the UTF-8 hold-back."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def run_stream(pieces, stops=(), chunks=None):
    tok = CharTokenizer(pieces)
    stream = TextStream(tok, list(stops))
    chunks = chunks or [[i] for i in range(len(pieces))]
    deltas = []
    for n, ids in enumerate(chunks):
        delta = stream.push(ids, finished=n == len(chunks) - 1)
        if delta is not None:
            deltas.append(delta)
        if stream.stopped:
            break
    return stream, deltas


def test_text_stream_holds_back_half_characters():
    euro = "€".encode()
    stream, deltas = run_stream([b"a", euro[:1], euro[1:], b"b"])
    assert [d.text for d in deltas] == ["a", "€", "b"]
    assert sum((d.token_ids for d in deltas), []) == [0, 1, 2, 3]  # every id exactly once
    assert stream.text == "a€b"


def test_text_stream_cuts_at_a_stop_string_and_keeps_only_the_tokens_needed():
    pieces = [b"hel", b"lo ", b"wor", b"ld", b"!"]
    stream, deltas = run_stream(pieces, stops=["o w"], chunks=[[0], [1, 2, 3, 4]])
    assert stream.stopped and stream.text == "hell"
    assert stream.tokens == [0, 1, 2]  # "hello wor" is the first prefix that holds the stop string
    assert "".join(d.text for d in deltas) == "hell"


def test_text_stream_shows_a_held_tail_that_never_becomes_a_stop():
    stream, deltas = run_stream([b"ab", b"c", b"x"], stops=["cd"])
    assert [d.text for d in deltas] == ["ab", "cx"]  # "c" waits: it could have begun "cd"
    assert not stream.stopped and stream.text == "abcx"


# -- extras ------------------------------------------------------------------------------------------------------
def test_missing_extra_is_one_line_naming_the_install(monkeypatch):
    require_extra("bench", "dyntree bench")  # installed for the tests
    monkeypatch.setitem(sys.modules, "sacrebleu", None)
    with pytest.raises(DynTreeError) as info:
        require_extra("bench", "dyntree bench")
    assert str(info.value) == ("dyntree bench needs the 'bench' extra (sacrebleu is missing): "
                               "pip install 'dyntree[bench]'")


@pytest.mark.parametrize("argv, module", [
    (["bench", "--methods", "ar"], "sacrebleu"),
    (["viz", "--prompt", "x"], "matplotlib"),
    (["train", "--data", "nowhere", "--out", "nowhere"], "accelerate"),
    (["quality"], "sacrebleu"),
])
def test_commands_check_their_extra_before_loading(argv, module, monkeypatch, capsys):
    from dyntree.cli import main

    monkeypatch.setitem(sys.modules, module, None)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "pip install 'dyntree[" in err and "\n" not in err
