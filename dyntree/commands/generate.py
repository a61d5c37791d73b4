"""`dyntree generate`: stream one answer, then the decoding statistics (optionally against plain decoding)."""

from __future__ import annotations

import sys

from ..cli import add_model_args, add_sampling_args, sampling_config, tree_config


def add_command(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text with multi-head tree decoding")
    p.add_argument("--prompt", required=True, help="the user message (chat template applied when the model has one)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--no-chat", action="store_true", help="feed the prompt as raw text, without the chat template")
    p.add_argument("--compare", action="store_true", help="also run plain decoding and compare speed and output")
    add_model_args(p)
    add_sampling_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console

    from ..api import DynTree
    from ..errors import DynTreeError
    from ..proposers import RootOnlyProposer

    if not args.prompt.strip():
        raise DynTreeError("empty prompt")
    if args.max_new_tokens < 1:
        raise DynTreeError("--max-new-tokens must be at least 1")
    sampling = sampling_config(args)
    err = Console(stderr=True, width=None if sys.stderr.isatty() else 132)
    dt = DynTree.from_pretrained(args.model, heads=args.heads, tree=tree_config(args), device=args.device,
                                 weights=args.weights)
    chat = False if args.no_chat else None
    dt.encode(args.prompt, chat)  # fail on a bad prompt before printing anything
    stats_list = []
    streamed_ids: list[int] = []
    for chunk in dt.stream(args.prompt, args.max_new_tokens, chat=chat, stats_out=stats_list, sampling=sampling):
        streamed_ids.extend(chunk.token_ids)
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    rows = [(f"dyntree {stats_list[0].method} {sampling.label}", stats_list[0])]
    same = None
    if args.compare:
        base = dt.generate(args.prompt, args.max_new_tokens, chat=chat, proposer=RootOnlyProposer(),
                           sampling=sampling)
        same = streamed_ids == base.token_ids
        rows.append(("plain decoding (ar)", base.stats))
    err.print(stats_table(rows))
    if dt.heads_note:
        err.print(f"[dim]heads: {dt.heads_note}[/dim]")
    prune = stats_list[0].early_prune
    if prune is not None:
        figures = prune.as_dict()
        err.print(f"[dim]early pruning after layer {prune.layer} to the early top-{prune.k}: "
                  f"{figures['pruned_nodes_per_pass']:.1f} nodes pruned per pass ({figures['pruned_share']:.0%}), "
                  f"{figures['miss_share']:.0%} of passes stopped at a pruned node (at least one token lost)[/dim]")
    err.print(f"[dim]weights: {dt.model.weights} (--weights {args.weights})[/dim]")
    if args.compare:
        speedup = rows[0][1].tokens_per_second / max(rows[1][1].tokens_per_second, 1e-9)
        if sampling.is_greedy:
            err.print(f"speedup over plain decoding: {speedup:.2f}x; identical output: {'yes' if same else 'NO'}")
        else:  # two samples differ by design; only their distribution can be compared (dyntree quality)
            err.print(f"speedup over plain sampling: {speedup:.2f}x (sampled outputs differ run to run by design)")
    return 0


def stats_table(rows):
    from rich.table import Table

    table = Table(title="decoding statistics")
    for col in ("method", "tokens", "passes", "acc/pass", "tok/s", "nodes",
                "ms/pass: propose", "forward", "verify", "cache"):
        table.add_column(col, justify="right" if col != "method" else "left")
    for name, s in rows:
        ms = s.phase_ms_per_pass()
        table.add_row(name, str(s.new_tokens), str(s.decode_passes + 1), f"{s.mean_accepted_per_pass:.2f}",
                      f"{s.tokens_per_second:.1f}", _nodes(s), f"{ms['proposal']:.1f}",
                      f"{ms['forward']:.1f}", f"{ms['verification']:.1f}", f"{ms['cache']:.1f}")
    return table


def _nodes(stats) -> str:
    """Tree size: fixed, or for a size chosen every step the largest and (in brackets) the mean."""
    sizes = stats.tree_sizes
    if sizes and min(sizes) != max(sizes):
        return f"{stats.tree_nodes} ({stats.mean_tree_size:.1f})"
    return str(stats.tree_nodes)
