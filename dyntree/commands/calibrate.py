"""`dyntree calibrate`: measure how often each head's guesses are accepted, for calibrated dynamic trees."""

from __future__ import annotations

from ..cli import add_model_args


def add_command(subparsers) -> None:
    p = subparsers.add_parser("calibrate", help="measure per-head acceptance rates for --tree-score rank|binned")
    p.add_argument("--prompts", required=True, help=".jsonl or text file of prompts (not your benchmark's)")
    p.add_argument("--count", type=int, default=16, help="how many prompts to decode (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--out", required=True, help="JSON file for the acceptance statistics")
    p.add_argument("--latency-out", default=None, metavar="FILE",
                   help="also measure this machine's step latency by tree size (for --tree-size auto "
                        "--latency FILE)")
    add_model_args(p)
    p.set_defaults(func=run, tree="dynamic")


def run(args) -> int:
    from rich.console import Console

    from ..api import DynTree
    from ..errors import DynTreeError
    from ..eval.calibration import collect_acceptance_stats, read_prompts

    if isinstance(args.tree_size, str):
        raise DynTreeError("calibrate takes an integer --tree-size (the width of the trees it learns from)")
    if args.count < 1 or args.max_new_tokens < 1:
        raise DynTreeError("--count and --max-new-tokens must be at least 1")
    prompts = read_prompts(args.prompts, args.count)
    dt = DynTree.from_pretrained(args.model, heads=args.heads, tree="ar", device=args.device, weights=args.weights)
    if dt.heads is None:
        raise DynTreeError("calibration needs heads (pass --heads)")
    console = Console(stderr=True)
    if args.latency_out:
        from ..trees.latency import measure_latency

        latency = measure_latency(dt.model.backbone, dt.heads, topk=args.topk or 8)
        latency.save(args.latency_out)
        console.print(f"wrote {args.latency_out}: ms per step by tree size: " +
                      ", ".join(f"{r}: {1000 * s:.1f}" for r, s in zip(latency.rows, latency.seconds)))
    stats = collect_acceptance_stats(dt, prompts, args.max_new_tokens, args.tree_size or 32, args.topk or 10,
                                     progress=lambda i, n: console.print(f"prompt {i}/{n}"))
    path = stats.save(args.out)
    rates = stats.rates("rank")
    console.print(f"wrote {path}; acceptance given the parent was accepted, by head (rows) and rank:")
    for head, row in enumerate(rates.tolist()):
        console.print(f"  head {head}: " + " ".join("  -  " if r != r else f"{r:.2f}" for r in row))
    return 0
