"""Interop: heads written in vLLM's and FasterDecoding's exact layouts load, decode token-exactly, and
survive an export -> load round trip with identical proposals; what a layout cannot hold is refused.

The two `Reference*` modules below rebuild each project's network the way its own source defines it
(FasterDecoding medusa/model/medusa_model.py, vLLM vllm/model_executor/models/medusa.py), so their
`state_dict()` keys are the projects' key layouts and their outputs are what those projects would draft.
"""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dyntree.cli import main
from dyntree.decoding import Decoder
from dyntree.errors import DynTreeError
from dyntree.heads import HeadsConfig, MedusaHeads
from dyntree.interop import ExportWarning, expand_to_vocabulary, export_heads, load_heads
from dyntree.proposers import DynamicTreeProposer, StaticTreeProposer
from dyntree.trees import StaticTree, load_tree_spec


# -- the other projects' networks ---------------------------------------------------------------------------
class ResBlock(nn.Module):  # FasterDecoding's name: the key is `{h}.{l}.linear.weight`
    def __init__(self, hidden):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        self.act = nn.SiLU()

    def forward(self, x):
        return x + self.act(self.linear(x))


class ReferenceFasterDecoding(nn.Module):
    """`medusa_head`: ModuleList of Sequential(ResBlock x L, Linear(H, V, bias=False)); logits `[K, N, V]`.

    Built as FasterDecoding builds it: `[ResBlock(H)] * L` is one block module repeated L times, so its
    state dict still has a key per block, but loading gives every position the last block's weights."""

    def __init__(self, num_heads, num_layers, hidden, vocab):
        super().__init__()
        self.medusa_head = nn.ModuleList(
            nn.Sequential(*([ResBlock(hidden)] * num_layers), nn.Linear(hidden, vocab, bias=False))
            for _ in range(num_heads))

    def forward(self, hidden):
        return torch.stack([head(hidden) for head in self.medusa_head])


class ReferenceVllm(nn.Module):
    """`blocks.{h}.layers.{l}`, `lm_heads.{h}` (over the truncated vocabulary); tokens outside `token_map`
    score -inf, and the draft is each head's argmax (vLLM proposes top-1 only)."""

    def __init__(self, num_heads, num_layers, hidden, vocab, truncated=None, fc_bias=True):
        super().__init__()
        self.vocab = vocab
        self.blocks = nn.ModuleList(nn.ModuleDict({"layers": nn.ModuleList(
            nn.Linear(hidden, hidden, bias=fc_bias) for _ in range(num_layers))}) for _ in range(num_heads))
        self.lm_heads = nn.ModuleList(nn.Linear(hidden, truncated or vocab, bias=False) for _ in range(num_heads))
        self.token_map = None

    def forward(self, hidden):
        out = []
        for block, lm_head in zip(self.blocks, self.lm_heads):
            x = hidden
            for layer in block["layers"]:
                x = x + nn.functional.silu(layer(x))
            logits = lm_head(x)
            if self.token_map is not None:
                full = torch.full((*logits.shape[:-1], self.vocab), -torch.inf)
                full[..., self.token_map] = logits
                logits = full
            out.append(logits)
        return torch.stack(out)


def randomize(module, seed, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return module


# -- helpers --------------------------------------------------------------------------------------------
def plain_tokens(backbone, prompt, max_new):
    return Decoder(backbone, eos_token_ids=()).run([prompt], max_new).consume().tokens[0]


class Recording(DynamicTreeProposer):
    """A dynamic tree proposer that keeps every tree it proposed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trees = []

    def propose(self, *args, **kwargs):
        proposal = super().propose(*args, **kwargs)
        self.trees.append(proposal.tokens.clone())
        return proposal


def decode_with(backbone, heads, prompt, max_new=24):
    proposer = Recording(heads.num_heads, topk=5, size=12, lookup=0)
    run = Decoder(backbone, heads, proposer, eos_token_ids=()).run([prompt], max_new).consume()
    return run.tokens[0], proposer.trees


def assert_static_tree_is_exact(backbone, heads):
    tree = StaticTree.build(load_tree_spec("mc_sim_7b_63")[1], 10, heads.num_heads)
    for seed in range(2):
        prompt = torch.randint(3, 128, (6 + seed,), generator=torch.Generator().manual_seed(seed)).tolist()
        run = Decoder(backbone, heads, StaticTreeProposer(tree), eos_token_ids=()).run([prompt], 24).consume()
        assert run.tokens[0] == plain_tokens(backbone, prompt, 24)


def hidden_states(cfg, n=16, seed=1):
    return torch.randn(n, cfg.hidden_size, generator=torch.Generator().manual_seed(seed))


def heads_of_kind(cfg, lm_head_weight, kind, tmp_path):
    """own: own full projection; own-int8-subset: stored int8 over a subset and loaded back (de-quantised);
    shared / shared-subset: the backbone's lm_head (over a subset)."""
    subset = torch.tensor(sorted(torch.randperm(cfg.vocab_size, generator=torch.Generator().manual_seed(3))[:40]
                                 .tolist()))
    own = kind.startswith("own")
    ids = subset if kind.endswith("subset") else None
    heads = MedusaHeads(HeadsConfig(5, 1, cfg.hidden_size, cfg.vocab_size, shared_projection=not own,
                                    model_type=cfg.model_type), ids)
    randomize(heads, seed=7, scale=0.1)
    if own:
        heads.init_projection_from(lm_head_weight)
        with torch.no_grad():
            heads.projection.add_(torch.randn(heads.projection.shape, generator=torch.Generator().manual_seed(8)) * .05)
    if kind == "own-int8-subset":
        heads = load_heads(heads.save(tmp_path / "int8", int8_projection=True), cfg)
    return heads


# -- the other projects' exact layouts load and decode exactly ------------------------------------------------
@pytest.mark.parametrize("file", ["medusa_lm_head.safetensors", "medusa_lm_head.pt"])
def test_fasterdecoding_checkpoint_decodes_token_exactly(tmp_path, tiny_backbone, file):
    cfg = tiny_backbone.config
    ref = randomize(ReferenceFasterDecoding(5, 1, cfg.hidden_size, cfg.vocab_size), seed=11).eval()
    with torch.no_grad():  # Medusa's initialisation: every projection starts as the lm_head
        for head in ref.medusa_head:
            head[-1].weight.add_(tiny_backbone.lm_head.weight.float())
    state = {k: v.detach().clone() for k, v in ref.medusa_head.state_dict().items()}
    assert {"0.0.linear.weight", "0.0.linear.bias", "0.1.weight", "4.1.weight"} <= set(state)
    if file.endswith(".pt"):
        torch.save(state, tmp_path / file)
    else:
        from safetensors.torch import save_file

        save_file(state, str(tmp_path / file))
    (tmp_path / "config.json").write_text(json.dumps(
        {"medusa_num_heads": 5, "medusa_num_layers": 1, "base_model_name_or_path": "tiny"}))
    heads = load_heads(tmp_path, cfg)
    assert heads.num_heads == 5 and heads.config.num_layers == 1 and heads.vocab_ids is None
    h = hidden_states(cfg)
    with torch.no_grad():
        expected = ref(h).transpose(0, 1)  # [N, K, V]
    torch.testing.assert_close(heads.logits(h, tiny_backbone.lm_head.weight_t).detach(), expected)
    ids, _ = heads.topk(h, tiny_backbone.lm_head, 10)
    assert torch.equal(ids, expected.topk(10, dim=-1).indices)  # the guesses FasterDecoding's trees take
    assert_static_tree_is_exact(tiny_backbone, heads)


@pytest.mark.parametrize("vocab", ["full", "truncated", "original_lm_head"])
def test_vllm_checkpoint_decodes_token_exactly(tmp_path, tiny_backbone, vocab):
    from safetensors.torch import save_file

    cfg = tiny_backbone.config
    truncated = 48 if vocab == "truncated" else None
    ref = randomize(ReferenceVllm(5, 1, cfg.hidden_size, cfg.vocab_size, truncated), seed=12).eval()
    state = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    config = {"model_type": "medusa", "architectures": ["MedusaModel"], "hidden_size": cfg.hidden_size,
              "vocab_size": cfg.vocab_size, "num_heads": 5, "num_hidden_layers": 1, "medusa_fc_bias": True}
    if truncated:
        ref.token_map = torch.randperm(cfg.vocab_size, generator=torch.Generator().manual_seed(2))[:truncated]
        state["token_map"] = ref.token_map.clone()
        config["truncated_vocab_size"] = truncated
    if vocab == "original_lm_head":  # one projection for every head, stored once
        with torch.no_grad():
            for lm_head in ref.lm_heads:
                lm_head.weight.copy_(ref.lm_heads[0].weight)
        state = {k: v for k, v in state.items() if not k.startswith("lm_heads.") or k == "lm_heads.0.weight"}
        config["original_lm_head"] = True
    assert {"blocks.0.layers.0.weight", "blocks.4.layers.0.bias", "lm_heads.0.weight"} <= set(state)
    save_file({f"medusa_heads.{k}" if k.startswith("blocks.1") else k: v for k, v in state.items()},
              str(tmp_path / "model.safetensors"))  # vLLM strips an optional "medusa_heads." prefix
    (tmp_path / "config.json").write_text(json.dumps(config))
    heads = load_heads(tmp_path, cfg)
    h = hidden_states(cfg)
    with torch.no_grad():
        expected = ref(h).transpose(0, 1)  # [N, K, V]
    ids, _ = heads.topk(h, tiny_backbone.lm_head, 1)
    assert torch.equal(ids[..., 0], expected.argmax(-1))  # vLLM's draft: each head's top-1
    if truncated:
        assert torch.equal(heads.vocab_ids, ref.token_map)
        torch.testing.assert_close(heads.logits(h, tiny_backbone.lm_head.weight_t).detach(),
                                   expected[..., ref.token_map])
    assert_static_tree_is_exact(tiny_backbone, heads)


# -- export -> load: identical proposals, and what the other projects would read ----------------------------
KINDS = ["own", "own-int8-subset", "shared", "shared-subset"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", ["vllm-medusa", "medusa"])
def test_export_round_trip_gives_identical_proposals(tmp_path, tiny_backbone, fmt, kind):
    cfg = tiny_backbone.config
    lm_head = tiny_backbone.lm_head.weight.float()
    heads = heads_of_kind(cfg, lm_head, kind, tmp_path)
    out = export_heads(heads, tmp_path / "out", fmt, lm_head_weight=lm_head, base_model="tiny")
    loaded = load_heads(out, cfg)
    assert loaded.config.model_type == cfg.model_type and loaded.num_heads == 5
    if heads.vocab_ids is None:
        assert loaded.vocab_ids is None
    else:
        assert torch.equal(loaded.vocab_ids, heads.vocab_ids)
    h = hidden_states(cfg)
    ids_a, p_a = heads.topk(h, tiny_backbone.lm_head, 10)
    ids_b, p_b = loaded.topk(h, tiny_backbone.lm_head, 10)
    assert torch.equal(ids_a, ids_b)
    torch.testing.assert_close(p_a, p_b, rtol=1e-5, atol=1e-6)
    prompt = [5, 17, 33, 40, 9]
    tokens_a, trees_a = decode_with(tiny_backbone, heads, prompt)
    tokens_b, trees_b = decode_with(tiny_backbone, loaded, prompt)
    assert tokens_a == tokens_b == plain_tokens(tiny_backbone, prompt, 24)
    if kind.startswith("own"):  # the same matrices in the same kernels: bit-identical trees
        assert len(trees_a) == len(trees_b) and all(torch.equal(a, b) for a, b in zip(trees_a, trees_b))

    # What the other project itself would load: strict key layout, and the same top guess.
    if fmt == "vllm-medusa":
        from safetensors.torch import load_file

        config = json.loads((out / "config.json").read_text())
        state = load_file(str(out / "model.safetensors"))
        assert config["model_type"] == "medusa" and config["architectures"] == ["MedusaModel"]
        assert config["num_heads"] == 5 and config["num_hidden_layers"] == 1 and config["medusa_fc_bias"] is True
        assert not [k for k in config if "num" in k and k not in ("num_heads", "num_hidden_layers")]
        truncated = config.get("truncated_vocab_size")
        assert (truncated is not None) == (heads.vocab_ids is not None) == ("token_map" in state)
        ref = ReferenceVllm(5, 1, cfg.hidden_size, cfg.vocab_size, truncated)
        if truncated:
            assert truncated == 40 and state["token_map"].dtype == torch.int64
            ref.token_map = state.pop("token_map")
        ref.load_state_dict(state, strict=True)
    else:
        from safetensors.torch import load_file

        config = json.loads((out / "config.json").read_text())
        assert config["medusa_num_heads"] == 5 and config["medusa_num_layers"] == 1
        assert config["base_model_name_or_path"] == "tiny"
        ref = ReferenceFasterDecoding(5, 1, cfg.hidden_size, cfg.vocab_size)
        ref.medusa_head.load_state_dict(load_file(str(out / "medusa_lm_head.safetensors")), strict=True)
    with torch.no_grad():
        assert torch.equal(ref(h).argmax(-1).T, ids_a[..., 0])


def multi_block_heads(cfg, lm_head_weight, num_heads=3, num_layers=2):
    heads = MedusaHeads(HeadsConfig(num_heads, num_layers, cfg.hidden_size, cfg.vocab_size, shared_projection=False,
                                    model_type=cfg.model_type))
    randomize(heads, seed=9, scale=0.2)
    heads.init_projection_from(lm_head_weight)
    return heads


def test_multi_block_heads_warn_for_fasterdecodings_loader(tmp_path, tiny_backbone):
    """3 heads x 2 blocks: the files are right (dyntree reads them back exactly) but FasterDecoding's repeated
    block module loads them strictly and wrongly, and its 5-head, strict=False load leaves heads 3-4 untrained;
    so the medusa export warns, in one line, and the vllm-medusa one (distinct modules) does not."""
    from safetensors.torch import load_file

    cfg = tiny_backbone.config
    heads = multi_block_heads(cfg, tiny_backbone.lm_head.weight.float())
    with pytest.warns(ExportWarning, match=r"\[ResBlock\(H\)\] \* L") as caught:
        out = export_heads(heads, tmp_path / "m", "medusa")
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    state = load_file(str(out / "medusa_lm_head.safetensors"))
    h = hidden_states(cfg)
    ids = heads.topk(h, tiny_backbone.lm_head, 1)[0][..., 0]
    assert torch.equal(load_heads(out, cfg).topk(h, tiny_backbone.lm_head, 1)[0][..., 0], ids)
    ref = ReferenceFasterDecoding(3, 2, cfg.hidden_size, cfg.vocab_size)
    ref.medusa_head.load_state_dict(state, strict=True)  # no error...
    for k in range(3):  # ...but both positions hold block 1
        assert ref.medusa_head[k][0] is ref.medusa_head[k][1]
        assert torch.equal(ref.medusa_head[k][0].linear.weight, heads.block_weight[k, 1])
    with torch.no_grad():
        assert not torch.equal(ref(h).argmax(-1).T, ids)
    five = ReferenceFasterDecoding(5, 2, cfg.hidden_size, cfg.vocab_size)
    missing = five.medusa_head.load_state_dict(state, strict=False).missing_keys
    assert {key.split(".")[0] for key in missing} == {"3", "4"}  # heads 4 and 5 keep their initial weights

    with warnings.catch_warnings():
        warnings.simplefilter("error", ExportWarning)
        out = export_heads(heads, tmp_path / "v", "vllm-medusa")
    ref = ReferenceVllm(3, 2, cfg.hidden_size, cfg.vocab_size)
    ref.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    with torch.no_grad():
        assert torch.equal(ref(h).argmax(-1).T, ids)


def test_filler_rows_never_beat_the_subsets_best_guess():
    """Whatever the head state, even where every subset logit is negative (a zero row would win there)."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 30, 16, generator=gen)
    rows[..., 0] += 4.0  # so that states along -e0 give every subset token a negative logit
    ids = torch.randperm(100, generator=gen)[:30]
    full = expand_to_vocabulary(rows, ids, 100)
    assert torch.equal(full[:, ids], rows)
    outside = torch.ones(100, dtype=torch.bool)
    outside[ids] = False
    x = torch.randn(500, 16, generator=gen) * 5
    x[:250, 0] = -40.0
    logits = torch.einsum("kvh,nh->knv", full, x)
    assert (logits[..., outside].amax(-1) < logits[..., ids].amax(-1)).all()


def test_fasterdecoding_pt_file_and_dtype(tmp_path, tiny_backbone):
    cfg = tiny_backbone.config
    heads = heads_of_kind(cfg, tiny_backbone.lm_head.weight, "own", tmp_path)
    out = export_heads(heads, tmp_path / "o", "medusa", dtype=torch.float16, torch_file=True)
    pt = torch.load(out / "medusa_lm_head.pt", weights_only=True)
    assert pt["0.1.weight"].dtype == torch.float16 and set(pt) == {
        f"{h}.0.linear.{w}" for h in range(5) for w in ("weight", "bias")} | {f"{h}.1.weight" for h in range(5)}
    (out / "medusa_lm_head.safetensors").unlink()  # the .pt alone loads too
    loaded = load_heads(out, cfg)
    torch.testing.assert_close(loaded.projection, heads.projection, rtol=1e-3, atol=1e-3)


def test_share_lm_head_writes_one_projection(tmp_path, tiny_backbone):
    cfg = tiny_backbone.config
    lm_head = tiny_backbone.lm_head.weight.float()
    heads = heads_of_kind(cfg, lm_head, "shared", tmp_path)
    out = export_heads(heads, tmp_path / "o", "vllm-medusa", lm_head_weight=lm_head, share_lm_head=True)
    from safetensors.torch import load_file

    assert [k for k in load_file(str(out / "model.safetensors")) if k.startswith("lm_heads.")] == ["lm_heads.0.weight"]
    assert json.loads((out / "config.json").read_text())["original_lm_head"] is True
    h = hidden_states(cfg)
    assert torch.equal(load_heads(out, cfg).topk(h, tiny_backbone.lm_head, 5)[0],
                       heads.topk(h, tiny_backbone.lm_head, 5)[0])


# -- refusals ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["vllm-medusa", "medusa"])
def test_path_conditional_heads_are_refused(tmp_path, tiny_backbone, fmt):
    cfg = tiny_backbone.config
    heads = MedusaHeads(HeadsConfig(3, 1, cfg.hidden_size, cfg.vocab_size, shared_projection=False,
                                    head_type="hydra"))
    with pytest.raises(DynTreeError, match="'hydra' heads cannot be exported") as err:
        export_heads(heads, tmp_path / "o", fmt)
    assert "\n" not in str(err.value) and not (tmp_path / "o").exists()


def test_shared_heads_need_the_backbone(tmp_path, tiny_backbone):
    heads = MedusaHeads.random(tiny_backbone.config, num_heads=2)
    with pytest.raises(DynTreeError, match="needs the backbone"):
        export_heads(heads, tmp_path / "o", "medusa")


def test_vllm_biases_without_medusa_fc_bias_are_an_error(tmp_path, tiny_backbone):
    cfg = tiny_backbone.config
    heads = heads_of_kind(cfg, tiny_backbone.lm_head.weight, "own", tmp_path)
    out = export_heads(heads, tmp_path / "o", "vllm-medusa")
    config = json.loads((out / "config.json").read_text())
    del config["medusa_fc_bias"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(DynTreeError, match="medusa_fc_bias"):
        load_heads(out, cfg)


# -- the command ----------------------------------------------------------------------------------------------
def run_cli(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.err


def assert_one_line_error(code, err, fragment):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err


def test_cli_exports_shared_heads_with_the_model(capsys, tmp_path, tiny_model_dir, tiny_backbone):
    MedusaHeads.random(tiny_backbone.config, num_heads=3, seed=2).save(tmp_path / "h")
    code, err = run_cli(capsys, "export", "--heads", str(tmp_path / "h"), "--format", "vllm-medusa",
                        "--out", str(tmp_path / "v"), "--model", str(tiny_model_dir))
    assert code == 0, err
    assert '"method": "medusa"' in err and "num_speculative_tokens" in err
    h = hidden_states(tiny_backbone.config)
    ids_a = load_heads(tmp_path / "h").topk(h, tiny_backbone.lm_head, 4)[0]
    assert torch.equal(load_heads(tmp_path / "v", tiny_backbone.config).topk(h, tiny_backbone.lm_head, 4)[0], ids_a)
    # The export itself converts on: vLLM -> FasterDecoding, with --force over a non-empty directory.
    code, err = run_cli(capsys, "export", "--heads", str(tmp_path / "v"), "--format", "medusa",
                        "--out", str(tmp_path / "v"), "--force")
    assert code == 0, err
    assert not (tmp_path / "v" / "model.safetensors").exists()
    assert torch.equal(load_heads(tmp_path / "v", tiny_backbone.config).topk(h, tiny_backbone.lm_head, 4)[0], ids_a)


def test_cli_warns_in_one_line_for_multi_block_medusa_exports(capsys, tmp_path, tiny_backbone):
    multi_block_heads(tiny_backbone.config, tiny_backbone.lm_head.weight.float()).save(tmp_path / "h")
    code, err = run_cli(capsys, "export", "--heads", str(tmp_path / "h"), "--format", "medusa",
                        "--out", str(tmp_path / "m"), "--pt")
    warned = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert code == 0 and len(warned) == 1 and "[ResBlock(H)] * L" in warned[0], err
    code, err = run_cli(capsys, "export", "--heads", str(tmp_path / "h"), "--format", "vllm-medusa",
                        "--out", str(tmp_path / "v"))
    assert code == 0 and "warning" not in err, err


@pytest.mark.parametrize("fmt", ["vllm-medusa", "medusa"])
def test_cli_exports_the_bundled_medusa_heads(capsys, tmp_path, fmt):
    """The shipped Medusa heads export in both layouts and load back with the same guesses; the default
    (hydra) heads are refused in one line that names them."""
    from dyntree.api import bundled_heads_dir

    code, err = run_cli(capsys, "export", "--heads", "medusa", "--format", fmt, "--out", str(tmp_path / "o"),
                        "--dtype", "float16")
    assert code == 0, err
    shipped = load_heads(bundled_heads_dir("medusa"))
    exported = load_heads(tmp_path / "o")
    assert exported.num_heads == shipped.num_heads and torch.equal(exported.vocab_ids, shipped.vocab_ids)
    h = torch.randn(4, 576, generator=torch.Generator().manual_seed(0))
    unused = SimpleNamespace(weight_t=None)  # own projections: the backbone's lm_head is not read
    assert torch.equal(exported.topk(h, unused, 3)[0], shipped.topk(h, unused, 3)[0])
    code, err = run_cli(capsys, "export", "--heads", "auto", "--format", fmt, "--out", str(tmp_path / "a"))
    assert_one_line_error(code, err, "--heads medusa")


@pytest.mark.parametrize("case", ["missing_heads", "bad_format", "out_not_empty", "out_is_file", "bad_dtype",
                                  "pt_for_vllm"])
def test_cli_bad_input_is_one_line(capsys, tmp_path, tiny_backbone, case):
    heads = heads_of_kind(tiny_backbone.config, tiny_backbone.lm_head.weight, "own", tmp_path)
    heads.save(tmp_path / "h")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("keep me")
    (tmp_path / "file").write_text("")
    base = ["export", "--heads", str(tmp_path / "h"), "--format", "medusa", "--out", str(tmp_path / "o")]
    args, fragment = {
        "missing_heads": (["export", "--heads", str(tmp_path / "nope"), "--format", "medusa", "--out",
                           str(tmp_path / "o")], "no heads at"),
        "bad_format": (base[:3] + ["--format", "onnx", "--out", str(tmp_path / "o")], "unknown --format 'onnx'"),
        "out_not_empty": (base[:5] + ["--out", str(tmp_path / "full")], "is not empty"),
        "out_is_file": (base[:5] + ["--out", str(tmp_path / "file")], "not a directory"),
        "bad_dtype": (base + ["--dtype", "int4"], "unknown --dtype"),
        "pt_for_vllm": (base[:3] + ["--format", "vllm-medusa", "--out", str(tmp_path / "o"), "--pt"],
                        "--pt applies"),
    }[case]
    code, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, fragment)
    assert (tmp_path / "full" / "notes.txt").read_text() == "keep me"


# -- eagle heads in EAGLE's layout, loaded as SGLang and vLLM load it ------------------------------------------
class ReferenceEagle(nn.Module):
    """What SGLang's `LlamaForCausalLMEagle` and vLLM's EAGLE drafter build from an EAGLE-1 checkpoint, on
    transformers' own Llama layer: a Llama config with one layer, `fc` over [token embedding; feature], the
    first layer's input norm replaced by the identity, the output sent to the target's lm_head; every
    checkpoint name but the lm_head's is read under a `model.` prefix."""

    def __init__(self, config: dict):
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        super().__init__()
        fields = {k: v for k, v in config.items() if k not in ("dyntree", "architectures", "bias", "torch_dtype")}
        hf_config = LlamaConfig(**fields)
        hf_config._attn_implementation = "eager"
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config["vocab_size"], config["hidden_size"])
        self.model.fc = nn.Linear(2 * config["hidden_size"], config["hidden_size"], bias=config.get("bias", False))
        self.model.layers = nn.ModuleList([LlamaDecoderLayer(hf_config, 0)])
        self.model.layers[0].input_layernorm = nn.Identity()  # EAGLE drops the first layer's input norm
        self.rotary = LlamaRotaryEmbedding(hf_config)

    def load(self, directory):
        from safetensors.torch import load_file

        tensors = {("model." + k if "lm_head" not in k else k): v for k, v in
                   load_file(str(directory / "model.safetensors")).items()}
        missing, unexpected = self.load_state_dict(tensors, strict=False)
        return missing, unexpected

    def forward(self, features: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.fc(torch.cat([self.model.embed_tokens(next_ids), features], dim=-1))
        n = x.shape[1]
        positions = torch.arange(n)[None]
        mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
        out = self.model.layers[0](x, attention_mask=mask, position_ids=positions,
                                   position_embeddings=self.rotary(x, positions))
        return out[0] if isinstance(out, tuple) else out


def test_eagle_export_loads_as_the_engines_load_it_and_drafts_the_same(tmp_path, tiny_backbone):
    from dyntree.eagle import EagleHeads

    drafted = EagleHeads.random(tiny_backbone.config, num_heads=3, scale=0.2, seed=3)
    drafted.config.drafter["rope_theta"] = 500000.0  # not the default: the engines must read it
    heads = EagleHeads(drafted.config)
    heads.load_state_dict(drafted.state_dict())
    out = export_heads(heads, tmp_path / "e", "eagle", backbone=tiny_backbone)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["architectures"] == ["LlamaForCausalLM"]
    reference = ReferenceEagle(config)
    missing, unexpected = reference.load(out)
    assert unexpected == [] and missing == []
    gen = torch.Generator().manual_seed(4)
    features = torch.randn(1, 9, tiny_backbone.config.hidden_size, generator=gen)
    next_ids = torch.randint(3, 128, (1, 9), generator=gen)
    with torch.no_grad():
        want = reference(features, next_ids) @ tiny_backbone.lm_head.weight_t
        got = heads.feature_logits(heads.sequence_features(features, next_ids, tiny_backbone.embed_tokens),
                                   tiny_backbone.lm_head.weight_t)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    with pytest.raises(DynTreeError, match="cannot be exported as eagle"):
        export_heads(MedusaHeads.random(tiny_backbone.config), tmp_path / "m", "eagle", backbone=tiny_backbone)
    with pytest.raises(DynTreeError, match="'eagle' heads cannot be exported as vllm-medusa"):
        export_heads(heads, tmp_path / "v", "vllm-medusa")


def test_cli_exports_eagle_heads(capsys, tmp_path, tiny_model_dir, tiny_backbone):
    from dyntree.eagle import EagleHeads

    EagleHeads.random(tiny_backbone.config, num_heads=2, seed=5).save(tmp_path / "h")
    code, err = run_cli(capsys, "export", "--heads", str(tmp_path / "h"), "--format", "eagle", "--out",
                        str(tmp_path / "e"), "--model", str(tiny_model_dir), "--dtype", "bfloat16")
    assert code == 0, err
    assert "--speculative-algorithm EAGLE" in err and '"method": "eagle"' in err
    assert json.loads((tmp_path / "e" / "config.json").read_text())["torch_dtype"] == "bfloat16"
