"""`dyntree quality`: accepted tokens per pass, speed, BLEU and KL for greedy, lossless and typical decoding."""

from __future__ import annotations

import argparse
import sys

from ..cli import add_model_args

DEFAULT_LIMIT = 8


def prompt_source(args) -> tuple[str, int | None, str | None]:
    """(prompt source, limit, deprecation note) from the options; the old spellings `--prompts N` (a count)
    and `--questions FILE` still work, with a note to print once the prompts are read."""
    source, limit, notes = args.prompts, args.limit, []
    if source.isdigit():
        notes.append(f"`--prompts {source}` is deprecated: use --limit {source} (--prompts names the prompt file, "
                     "as in `dyntree bench`)")
        if limit is None:
            limit = int(source)
        source = "mtbench"
    if args.questions is not None:
        notes.append("--questions is deprecated: use --prompts FILE")
        source = args.questions
    if limit is None and args.per_category is None:
        limit = DEFAULT_LIMIT
    return source, limit, "; ".join(notes) or None


def add_command(subparsers) -> None:
    p = subparsers.add_parser("quality", help="compare greedy, lossless and typical sampling: speed, BLEU, KL")
    p.add_argument("--prompts", default="mtbench",
                   help="prompt file (as in `dyntree bench`), 'mtbench' (default: MT-Bench's 80 questions, shipped "
                        "with dyntree) or 'builtin'; the first turn of each is decoded. A number N is the old "
                        "spelling of --limit N (deprecated)")
    p.add_argument("--limit", type=int, default=None, help="use the first N prompts (default 8)")
    p.add_argument("--per-category", type=int, default=None, metavar="N",
                   help="use the first N prompts of every category (a balanced MT-Bench subset)")
    p.add_argument("--questions", default=None, help=argparse.SUPPRESS)  # deprecated: --prompts FILE
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the sampled rows")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kl-samples", type=int, default=1000, help="draws per context for the KL estimate")
    p.add_argument("--typical-eps", type=float, default=None, help="typical acceptance eps (default 0.09)")
    p.add_argument("--typical-alpha", type=float, default=None, help="typical acceptance alpha (default 0.3)")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    from pathlib import Path

    from rich.console import Console

    from ..api import DynTree
    from ..cli import tree_config
    from ..errors import DynTreeError
    from ..eval.quality import measure_quality, quality_table
    from ..extras import require_extra
    from ..prompts import load_prompts
    from ..sampling import SamplingConfig

    require_extra("bench", "dyntree quality")  # before the model loads
    source, limit, note = prompt_source(args)
    if args.max_new_tokens < 1 or args.kl_samples < 1:
        raise DynTreeError("--max-new-tokens and --kl-samples must be at least 1")
    if args.temperature <= 0:
        raise DynTreeError("--temperature must be > 0 (the greedy rows are always included)")
    SamplingConfig.from_options(args.temperature, args.top_p, args.top_k, args.seed, "typical", args.typical_eps,
                                args.typical_alpha)  # bad values fail before the model loads
    tree = tree_config(args)
    out = Path(args.out) if args.out else None
    if out is not None and not out.parent.is_dir():
        raise DynTreeError(f"cannot write {out}: no such directory")
    prompts = [p.turns[0] for p in load_prompts(source, limit, args.per_category)]
    if note:  # after the checks: bad input still gets one `error:` line
        print(f"note: {note}", file=sys.stderr)
    err = Console(stderr=True)
    dt = DynTree.from_pretrained(args.model, heads=args.heads, tree=tree, device=args.device, weights=args.weights)
    report = measure_quality(dt, prompts, args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed,
                             args.kl_samples, args.typical_eps, args.typical_alpha,
                             progress=lambda m: err.print(f"[dim]{m}[/dim]"))
    console = Console()
    if not console.is_terminal:
        console = Console(width=140)  # a file or pipe: keep the table on one line per row
    console.print(quality_table(report))
    ratio = report["lossless_over_greedy_accepted"]
    if ratio is not None:
        print(f"lossless accepted/pass as a share of greedy's: {ratio:.1%} (target >= 85%)")
    if dt.heads_note:
        err.print(f"[dim]heads: {dt.heads_note}[/dim]")
    if out is not None:
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(report, indent=2))
        tmp.replace(out)
    return 0
