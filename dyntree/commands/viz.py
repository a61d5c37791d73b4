"""`dyntree viz`: decode a prompt and draw the candidate trees of chosen steps as PNG files."""

from __future__ import annotations

from pathlib import Path

from ..cli import add_model_args, tree_config


def add_command(subparsers) -> None:
    p = subparsers.add_parser("viz", help="render the candidate trees of chosen decoding steps as PNG")
    p.add_argument("--prompt", required=True, help="the user message (chat template applied when the model has one)")
    p.add_argument("--steps", default="1-4", help="decoding steps to draw, e.g. '1,5,10' or '2-6' (default 1-4)")
    p.add_argument("--out", default="trees", help="output directory for step-NNN.png (default ./trees)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--no-chat", action="store_true", help="feed the prompt as raw text, without the chat template")
    add_model_args(p)
    p.set_defaults(func=run, tree="dynamic")


def run(args) -> int:
    from rich.console import Console

    from ..api import DynTree
    from ..errors import DynTreeError
    from ..viz import parse_steps, record_trees, render_tree

    from ..extras import require_extra

    require_extra("viz", "dyntree viz")  # before the model loads
    steps = parse_steps(args.steps)
    if not args.prompt.strip():
        raise DynTreeError("empty prompt")
    if args.max_new_tokens < 1:
        raise DynTreeError("--max-new-tokens must be at least 1")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DynTreeError(f"--out {out} exists and is not a directory")
    dt = DynTree.from_pretrained(args.model, heads=args.heads, tree=tree_config(args), device=args.device,
                                 weights=args.weights)
    if dt.heads is None:
        raise DynTreeError("no heads, so no candidate trees to draw (pass --heads)")
    chat = False if args.no_chat else None
    snapshots, text = record_trees(dt, args.prompt, steps, args.max_new_tokens, chat)
    if not snapshots:
        raise DynTreeError(f"generation ended before step {steps[0]}; ask for earlier --steps")
    console = Console(stderr=True)
    for snap in snapshots:
        path = render_tree(snap, out / f"step-{snap.step:03d}.png")
        console.print(f"step {snap.step}: {len(snap.tokens)} nodes, {len(snap.accepted)} tokens accepted -> {path}")
    missing = sorted(set(steps) - {s.step for s in snapshots})
    if missing:
        console.print(f"[dim]generation ended before steps {missing}[/dim]")
    if dt.heads_note:
        console.print(f"[dim]heads: {dt.heads_note}[/dim]")
    return 0
