"""`dyntree` command line. Each subcommand lives beside the stage it drives and registers itself here."""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import DynTreeError

# Modules that contribute subcommands through `add_command(subparsers)`.
COMMAND_MODULES = ("dyntree.commands",)


def add_model_args(parser: argparse.ArgumentParser, tree: bool = True) -> None:
    """Options shared by every command that decodes: model, heads, tree."""
    parser.add_argument("--model", default="default",
                        help="'default' (SmolLM2-135M-Instruct, embedded) or a local Hugging Face model directory")
    parser.add_argument("--heads", default="auto",
                        help="'auto' (bundled heads of the default model: its hydra heads), 'medusa' (its bundled "
                             "Medusa heads) or 'hydra', a heads directory (dyntree, Medusa v0.1 or vLLM Medusa "
                             "layout), 'random' (untrained, shows losslessness only) or 'none'")
    if tree:
        parser.add_argument("--tree", default="dynamic",
                            help="'dynamic' (default: built every step from the heads and a context lookup, 8 nodes; "
                                 "the fastest on CPU), 'static' (Medusa's 63-node tree; 'static:N' its first N "
                                 "nodes; over hydra heads read depth by depth), 'ar' (no tree), or a JSON file of "
                                 "paths")
        parser.add_argument("--tree-size", default=None,
                            help="nodes per dynamic tree, root included (default: the measured best on CPU), "
                                 "or 'auto' / 'auto:N': choose the size every step from the expected accepted "
                                 "tokens and this machine's measured step latency, up to N nodes")
        parser.add_argument("--latency", default=None, metavar="FILE",
                            help="step latency by tree size (JSON from `dyntree calibrate --latency-out`) for "
                                 "--tree-size auto; measured at start-up (a few seconds) when omitted")
        parser.add_argument("--topk", type=int, default=None,
                            help="guesses taken from each head (default 10 static, measured best dynamic)")
        parser.add_argument("--tree-score", default=None, choices=("prob", "rank", "binned"),
                            help="dynamic tree node scores: head probabilities (default), or acceptance rates "
                                 "measured online per head and rank / per head and probability bin")
        parser.add_argument("--tree-temperature", type=float, default=None, metavar="T",
                            help="dynamic trees: sharpen (<1) or flatten (>1) the heads' probabilities before "
                                 "ranking nodes (default 2 with probability scores, 1 with calibrated ones); "
                                 "unrelated to the sampling --temperature")
        parser.add_argument("--lookup", type=int, default=None, metavar="N",
                            help="dynamic trees: up to N tokens copied from the prompt / text so far where its "
                                 "last tokens occurred before, as one branch of the same node budget "
                                 "(default: the measured best; 0 = heads only)")
        parser.add_argument("--recycle", type=int, default=None, metavar="N",
                            help="dynamic trees: up to N recycled candidates per tree (each token's successors "
                                 "seen in verified text so far) inside the same node budget (default: 2; 0 = off)")
        parser.add_argument("--early-prune", default=None, metavar="LAYER:K",
                            help="ProPD early pruning: after LAYER layers, drop the tree nodes whose token is not "
                                 "in their parent's early top-K (the model's own lm_head on that layer's state), "
                                 "and run the later layers on the rest only; lossless. 'off' (default): it "
                                 "pays only where a tree pass is compute-bound (large trees on GPUs)")
        parser.add_argument("--tree-calibration", default=None, metavar="FILE",
                            help="acceptance statistics (JSON, from `dyntree calibrate`) to start the "
                                 "dynamic tree's scores from")
    parser.add_argument("--weights", "--dtype", dest="weights", default="auto",
                        help="how the model's weights are held: 'auto' (default: the GGUF file's own 4-bit blocks "
                             "where dyntree's native kernels are measured faster on this machine, else bfloat16 "
                             "where it multiplies faster, else float32; measured once and cached), 'gguf' (the "
                             "file's blocks), 'q4' (a float checkpoint quantized to 4-bit groups: lossy), "
                             "'float32', 'bfloat16' or 'float16' (GPUs). --dtype is the older name")
    parser.add_argument("--device", default=None, help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """--temperature/--top-p/--top-k/--seed/--acceptance: how tokens are chosen (default greedy)."""
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 (default) = greedy, token-exact with plain decoding; > 0 samples")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling (same seed, same output)")
    parser.add_argument("--acceptance", choices=("lossless", "typical"), default="lossless",
                        help="how sampled tree candidates are verified: 'lossless' (the model's own "
                             "distribution) or 'typical' (Medusa's typical acceptance: faster, biased)")
    parser.add_argument("--typical-eps", type=float, default=None, help="typical acceptance: eps (default 0.09)")
    parser.add_argument("--typical-alpha", type=float, default=None, help="typical acceptance: alpha (default 0.3)")


def sampling_config(args):
    """The SamplingConfig the sampling flags describe (validated: bad values raise DynTreeError)."""
    from .sampling import SamplingConfig

    return SamplingConfig.from_options(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                       seed=args.seed, mode=args.acceptance, eps=args.typical_eps,
                                       alpha=args.typical_alpha)


def tree_config(args):
    """The TreeConfig the tree flags describe (validated once here: bad values raise DynTreeError)."""
    from .config import TreeConfig

    return TreeConfig.parse(args.tree, args.tree_size, topk=args.topk, score=args.tree_score,
                            tree_temperature=args.tree_temperature, lookup=args.lookup,
                            calibration=args.tree_calibration, latency=args.latency, recycle=args.recycle,
                            early_prune=args.early_prune)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dyntree", description="Lossless multi-head (Medusa) decoding with "
                                                                 "static and dynamic tree attention")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args) or 0)
    except DynTreeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
