"""Weights in quantized blocks (GGUF Q4_1 / Q8_0) run by the native kernels: the decoded weights equal a
de-quantizer's, every row's result is independent of the rows beside it on *this* CPU, and greedy tree
decoding is token-exact against plain decoding on the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_hf_model, write_tiny_model_dir
from dyntree.decoding import Decoder
from dyntree.errors import DynTreeError
from dyntree.loading import cache_root, load_model
from dyntree.model import ModelConfig, Transformer
from dyntree.native import load as load_native
from dyntree.quantized import NativeDense, QuantMatrix, quantize_q8_0, unpermute_rotary_rows
from test_bf16 import PathProposer, plain

lib, why_not = load_native(cache_root())
needs_native = pytest.mark.skipif(lib is None, reason=f"no native kernels here: {why_not}")


def _random_blocks(kind: str, out: int, inner: int, seed: int = 0) -> np.ndarray:
    """Raw GGUF bytes of a random matrix in `kind` (scales drawn as fp16, codes uniform)."""
    rng = np.random.default_rng(seed)
    blocks = out * inner // 32
    scale = rng.normal(0, 0.01, (blocks, 1)).astype(np.float16).view(np.uint8)
    if kind == "Q4_1":
        low = rng.normal(0, 0.05, (blocks, 1)).astype(np.float16).view(np.uint8)
        codes = rng.integers(0, 256, (blocks, 16), dtype=np.uint8)
        raw = np.concatenate([scale, low, codes], axis=1)
    else:
        codes = rng.integers(-127, 128, (blocks, 32), dtype=np.int8).view(np.uint8)
        raw = np.concatenate([scale, codes], axis=1)
    return raw.reshape(out, -1)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_decoded_weights_equal_the_gguf_dequantizer(kind):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    raw = _random_blocks(kind, 48, 96)
    matrix = QuantMatrix.from_gguf(kind, raw, (48, 96))
    reference = dequantize(raw, GGMLQuantizationType[kind])
    assert torch.equal(matrix.dequantize(), torch.from_numpy(reference.reshape(48, 96)))


@needs_native
@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("shape", [(96, 64), (200, 576)])
def test_native_product_rows_do_not_depend_on_row_count(kind, shape):
    """A row's bits alone equal its bits among 1..19 rows, at 1 and 2 threads, and agree with fp32."""
    matrix = QuantMatrix.from_gguf(kind, _random_blocks(kind, *shape, seed=shape[0]), shape)
    dense = NativeDense(matrix, lib)
    x = torch.randn(19, shape[1], generator=torch.Generator().manual_seed(1))
    alone = torch.cat([dense(x[i:i + 1]) for i in range(19)])
    for rows in range(1, 20):
        assert torch.equal(dense(x[:rows]), alone[:rows]), f"{rows} rows"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(dense(x), alone)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(alone, x @ matrix.dequantize().T, rtol=1e-4, atol=1e-4)


@needs_native
@pytest.mark.parametrize("inputs", [576, 1536])
def test_native_product_of_many_rows_goes_in_blocks_with_the_same_bits(inputs):
    """A prefill's many rows are taken in cache-sized blocks (21 or 56 rows here): every row keeps its bits."""
    matrix = QuantMatrix.from_gguf("Q4_1", _random_blocks("Q4_1", 48, inputs, seed=7), (48, inputs))
    dense = NativeDense(matrix, lib)
    x = torch.randn(150, inputs, generator=torch.Generator().manual_seed(3))
    alone = torch.cat([dense(x[i:i + 1]) for i in range(150)])
    assert torch.equal(dense(x), alone)
    assert torch.equal(dense(x[:57]), alone[:57])


def test_rotary_rows_are_put_back_in_hugging_face_order():
    """GGUF interleaves each head's rotary halves: row (h, i, j) of HF order sits at (h, j, i) in the file."""
    heads, half = 2, 3
    hf_rows = torch.arange(heads * 2 * half)
    file_rows = hf_rows.reshape(heads, 2, half).transpose(1, 2).reshape(-1)  # the converter's permutation
    codes = file_rows[:, None].repeat(1, 16).to(torch.uint8)
    matrix = QuantMatrix(0, codes, torch.ones(len(hf_rows), 1), torch.zeros(len(hf_rows), 1))
    assert torch.equal(unpermute_rotary_rows(matrix, heads).codes[:, 0], hf_rows.to(torch.uint8))


def test_q4_rounding_is_within_half_a_step():
    weight = torch.randn(8, 64)
    matrix = QuantMatrix.quantize_q4_1(weight)
    step = matrix.scales.repeat_interleave(32, 1)
    assert ((matrix.dequantize() - weight).abs() <= step / 2 + 1e-3).all()
    q8 = quantize_q8_0(weight)
    assert ((q8.dequantize() - weight).abs() <= q8.scales.repeat_interleave(32, 1) / 2 + 1e-6).all()


@pytest.fixture(scope="module")
def q4_tiny(tmp_path_factory):
    if lib is None:
        pytest.skip(f"no native kernels here: {why_not}")
    model_dir = write_tiny_model_dir(tmp_path_factory.mktemp("tiny-q4"), tiny_hf_model(seed=4))
    return load_model(model_dir, weights="q4")


def test_quantized_forward_matches_fp32_on_the_same_weights(q4_tiny):
    """The native stack computes the model whose weights are the decoded blocks (only summation order
    differs from the eager fp32 forward)."""
    quant = q4_tiny.backbone
    layers = quant.quant.layers
    state = {"embed_tokens.weight": quant.embed_tokens, "norm.weight": quant.norm,
             "lm_head.weight": quant.lm_head.weight}
    cfg = quant.config
    q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    for i, layer in enumerate(layers):
        p = f"layers.{i}."
        qkv, gate_up = layer["qkv"].dequantize(), layer["gate_up"].dequantize()
        state.update({p + "input_layernorm.weight": layer["attn_norm"],
                      p + "post_attention_layernorm.weight": layer["mlp_norm"],
                      p + "self_attn.q_proj.weight": qkv[:q_rows],
                      p + "self_attn.k_proj.weight": qkv[q_rows:q_rows + kv_rows],
                      p + "self_attn.v_proj.weight": qkv[q_rows + kv_rows:],
                      p + "self_attn.o_proj.weight": layer["o"].dequantize(),
                      p + "mlp.gate_proj.weight": gate_up[:cfg.intermediate_size],
                      p + "mlp.up_proj.weight": gate_up[cfg.intermediate_size:],
                      p + "mlp.down_proj.weight": layer["down"].dequantize()})
    reference = Transformer(ModelConfig.from_hf(tiny_hf_model(seed=4).config), state)
    ids = torch.randint(3, cfg.vocab_size, (2, 23), generator=torch.Generator().manual_seed(0))
    got = quant.forward(ids, quant.new_cache(2, 64))
    want = reference.forward(ids, reference.new_cache(2, 64))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(quant.logits(got), reference.logits(want), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed", range(4))
def test_quantized_tree_decoding_is_token_exact(q4_tiny, seed):
    backbone = q4_tiny.backbone
    prompt = torch.randint(3, backbone.config.vocab_size, (4 + 5 * seed,),
                           generator=torch.Generator().manual_seed(seed)).tolist()
    reference = plain(backbone, prompt, 40)
    run = Decoder(backbone, proposer=PathProposer(reference, backbone.config.vocab_size, seed),
                  eos_token_ids=()).run([prompt], 40).consume()
    assert run.tokens[0] == reference
    assert run.stats.mean_accepted_per_pass > 1.2


def test_quantized_batch_rows_equal_their_sequences_alone(q4_tiny):
    backbone = q4_tiny.backbone
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, backbone.config.vocab_size, (n,), generator=gen).tolist() for n in (5, 17, 9)]
    together = Decoder(backbone, eos_token_ids=()).run(prompts, 24).consume().tokens
    assert together == [plain(backbone, p, 24) for p in prompts]


def test_quantized_weights_refuse_other_devices_and_unknown_names(tiny_model_dir):
    with pytest.raises(DynTreeError, match="CPU only"):
        load_model(tiny_model_dir, weights="q4", device="cuda")
    with pytest.raises(DynTreeError, match="unknown weights"):
        load_model(tiny_model_dir, weights="int3")


@pytest.mark.slow
@needs_native
def test_default_model_gguf_blocks_are_the_files_weights_and_decode_exactly():
    """The file's blocks decode to exactly the fp32 de-quantized model's weights, and a tree decodes
    token-exactly against plain decoding on the blocks."""
    gguf = load_model("default", weights="gguf")
    assert gguf.weights == "gguf"
    float_layer = load_model("default", weights="float32").backbone.layers[7]
    layer = gguf.backbone.quant.layers[7]
    assert torch.equal(layer["qkv"].dequantize(), float_layer.qkv.weight)
    assert torch.equal(layer["down"].dequantize(), float_layer.down.weight)
    assert torch.equal(gguf.backbone.lm_head.weight, gguf.backbone.embed_tokens)
    tok = gguf.tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": "Name three rivers."}], add_generation_prompt=True,
                                   tokenize=False)
    prompt = tok.encode(chat, add_special_tokens=False)
    reference = plain(gguf.backbone, prompt, 40)
    run = Decoder(gguf.backbone, proposer=PathProposer(reference, gguf.config.vocab_size, 0),
                  eos_token_ids=()).run([prompt], 40).consume()
    assert run.tokens[0] == reference


@needs_native
@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_avx2_build_is_row_independent_and_agrees(kind):
    """The AVX2 + FMA variant (what AVX2-only CPUs such as AMD Zen 3 build) checked here too, where this CPU can
    run it: rows independent of their neighbours, results within rounding of the native build's."""
    avx2, why = load_native(cache_root(), march="haswell")
    if avx2 is None:
        pytest.skip(f"no AVX2 build here: {why}")
    if avx2.dyntree_vector_width() != 8:
        pytest.skip("the haswell build did not take the AVX2 path")
    shape = (120, 576)
    matrix = QuantMatrix.from_gguf(kind, _random_blocks(kind, *shape, seed=5), shape)
    dense, native = NativeDense(matrix, avx2), NativeDense(matrix, lib)
    x = torch.randn(11, shape[1], generator=torch.Generator().manual_seed(2))
    alone = torch.cat([dense(x[i:i + 1]) for i in range(11)])
    for rows in range(1, 12):
        assert torch.equal(dense(x[:rows]), alone[:rows]), f"{rows} rows"
    torch.testing.assert_close(alone, native(x), rtol=1e-5, atol=1e-5)


def test_without_a_compiler_quantized_weights_fail_in_one_line(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("DYNTREE_CACHE", str(tmp_path / "cache"))
    lib_here, why = load_native(tmp_path / "cache")
    assert lib_here is None and "compiler" in why
    with pytest.raises(DynTreeError, match="native kernels: no working C compiler"):
        load_model(tiny_model_dir, weights="q4")


def test_gguf_weights_refuse_a_hugging_face_directory(tiny_model_dir):
    """The file's blocks exist for the default model only: another model must not silently get its weights."""
    with pytest.raises(DynTreeError, match="--weights gguf runs the default model's GGUF file"):
        load_model(tiny_model_dir, weights="gguf")


@pytest.mark.parametrize("subset", [None, 40])
def test_eagle_drafts_on_the_quantized_backbone_are_exact_and_replay_like_decoding(q4_tiny, subset):
    """Eagle heads draft through Q8_0 copies of their layer (and of the lm_head rows of their vocabulary) on a
    quantized backbone: decoding stays token-exact, drafts round only a little against the fp32 parameters,
    and replay on the recorded states accepts exactly what decoding accepted."""
    from dyntree.config import TreeConfig
    from dyntree.eagle import EagleHeads
    from dyntree.eval.replay import replay, with_states
    from dyntree.proposers import build_proposer

    backbone = q4_tiny.backbone
    vocab = None if subset is None else torch.arange(3, 3 + subset)
    heads = EagleHeads.random(backbone.config, num_heads=3, scale=0.3, seed=1)
    if vocab is not None:
        heads = EagleHeads(heads.config, vocab).eval()
        heads.load_tensors(EagleHeads.random(backbone.config, num_heads=3, scale=0.3, seed=1).stored_tensors(), "x")
    assert heads.draft_ops(backbone) is not None
    prompt = [1, 5, 6, 7, 8, 9, 10]

    def make():
        return build_proposer(TreeConfig(kind="dynamic", size=8, topk=3, lookup=0, recycle=0), 3, conditional=True)

    reference = plain(backbone, prompt, 30)
    run = Decoder(backbone, heads, make(), eos_token_ids=()).run([prompt], 30).consume()
    assert run.tokens[0] == reference
    record = with_states([{"tokens": prompt + reference, "prompt_len": len(prompt)}], backbone)[0]
    assert replay(make(), record, heads=heads, backbone=backbone).accepted_lengths == run.stats.accepted_lengths
    # Q8_0 drafting against the fp32 parameters: the same features up to rounding, guesses in the vocabulary.
    draft = heads.draft_along(backbone, record["states"], torch.tensor(record["tokens"]), len(prompt), 5)
    requests = [(k, ()) for k in range(10)]
    fast = draft.features(requests)
    exact = heads.sequence_features(record["states"][None, : len(prompt) + 9],
                                    torch.tensor([record["tokens"][1 : len(prompt) + 10]]),
                                    backbone.embed_tokens)[0, len(prompt) - 1 :]
    assert (fast - exact).norm() / exact.norm() < 0.2  # Q8_0 rounding of random weights; a wrong product is ~1
    guesses = draft.rows(0, 1).expand([(0, ())])[0]
    if vocab is not None:
        assert all(int(t) in set(vocab.tolist()) for t, _ in guesses)
