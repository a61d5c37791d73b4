"""`dyntree bench`: time several decoding methods on the same model and prompts, in one interleaved run."""

from __future__ import annotations

import importlib.util
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

from ..cli import add_model_args

DEFAULT_METHODS = ("hf", "hf-lookup", "ar", "static", "dynamic")
TREE_METHODS = ("static", "dynamic")


def default_methods() -> str:
    """Every standard method this build has (dynamic only once its module exists)."""
    from ..bench import METHODS

    available = []
    for name in DEFAULT_METHODS:
        module = METHODS[name].requires_module
        if module is None or importlib.util.find_spec(module) is not None:
            available.append(name)
    return ",".join(available)


def add_command(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmark decoding methods (speed, accepted length, exactness)",
                              description="Runs every method on the same model and prompts, interleaved per "
                                          "prompt, and writes results.json, results.md and plots to --out.")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods, each NAME or NAME:key=value[:key=value] (e.g. dynamic:n=8, "
                        "hf-lookup:n=5, ar:temperature=0.7, dynamic:temperature=0.7:accept=typical); default: "
                        f"{','.join(DEFAULT_METHODS)} (those available). --list-methods shows them all")
    p.add_argument("--list-methods", action="store_true", help="list the available methods and exit")
    p.add_argument("--prompts", default="builtin",
                   help="JSONL file (MT-Bench 'turns', or 'prompt'/'question'/'instruction' rows), 'mtbench' "
                        "(MT-Bench's 80 questions, shipped with dyntree) or 'builtin' "
                        "(12 short prompts shipped with dyntree)")
    p.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    p.add_argument("--per-category", type=int, default=None, metavar="N",
                   help="use the first N prompts of every category (a balanced MT-Bench subset)")
    p.add_argument("--turns", type=int, default=1, choices=(1, 2),
                   help="1: first turns only; 2: also the second turn, continuing ar's first answer")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0,
                   help="sampling seed of our methods that give no seed= (each prompt's generator is seeded from "
                        "it and the prompt, so a rerun gives the same tokens); also the torch seed set before "
                        "every run")
    p.add_argument("--kl-samples", type=int, default=400,
                   help="draws per context for the first-token KL of sampling methods (0 = skip it; default 400)")
    p.add_argument("--kl-contexts", type=int, default=4,
                   help="fixed contexts for the KL: the first N prompts' first turns (default 4)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds before timing (default 1)")
    p.add_argument("--repeats", type=int, default=1,
                   help="time every prompt this many times; the median time is used (default 1)")
    p.add_argument("--batch-size", default="1", metavar="B[,B...]",
                   help="decode prompts B at a time with every method (our methods only; default 1); a list such "
                        "as 1,2,4,8,16 runs once per size into OUT/batch<B>/ and writes the speedup-by-batch-size "
                        "table and plot (batch_sweep.md/.json/.png) to OUT")
    p.add_argument("--early-prune", default=None, metavar="LAYER:K",
                   help="ProPD early pruning for every tree method that sets no early_prune= of its own "
                        "(e.g. 8:4; 'off'); per method: dynamic:early_prune=8:4")
    p.add_argument("--no-chat", action="store_true", help="feed prompts as raw text, without the chat template")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--out", default=None, help="output folder (default: bench-out/<UTC time>)")
    add_model_args(p, tree=False)
    p.set_defaults(func=run)


def _command_line(args, methods: str, out: Path, batch_size: str | None = None) -> str:
    """The run written out with every effective option, so it can be repeated exactly."""
    parts = ["dyntree", "bench", "--methods", methods, "--prompts", args.prompts]
    if args.per_category is not None:
        parts += ["--per-category", str(args.per_category)]
    if args.limit is not None:
        parts += ["--limit", str(args.limit)]
    parts += ["--turns", str(args.turns), "--max-new-tokens", str(args.max_new_tokens), "--seed", str(args.seed),
              "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--kl-samples", str(args.kl_samples),
              "--kl-contexts", str(args.kl_contexts), "--model", args.model,
              "--heads", str(args.heads)]
    batch_size = batch_size if batch_size is not None else getattr(args, "batch_size", "1")
    if str(batch_size) != "1":
        parts += ["--batch-size", str(batch_size)]
    if args.early_prune is not None:
        parts += ["--early-prune", args.early_prune]
    if args.no_chat:
        parts.append("--no-chat")
    if args.weights != "auto":
        parts += ["--weights", args.weights]
    if args.device:
        parts += ["--device", args.device]
    if args.threads:
        parts += ["--threads", str(args.threads)]
    parts += ["--out", str(out)]
    return shlex.join(parts)


def list_methods(console) -> None:
    from ..bench import METHODS

    for name, entry in METHODS.items():
        missing = entry.requires_module and importlib.util.find_spec(entry.requires_module) is None
        state = f" [red](unavailable: {entry.requires_module} missing)[/red]" if missing else ""
        console.print(f"[bold]{name}[/bold]: {entry.description}{state}")


def run(args) -> int:
    from rich.console import Console

    from ..bench import (BenchContext, BenchSettings, build_methods, collect_results, load_prompts, measures_kl,
                         parse_method_list, run_benchmark, write_outputs)
    from ..bench.report import notes, rich_tables
    from ..bench.runner import check_batch_methods
    from ..bench.sweep import check_batch_sizes, parse_batch_sizes, write_sweep
    from ..errors import DynTreeError
    from ..extras import require_extra

    require_extra("bench", "dyntree bench")  # before the model loads
    console = Console()
    err = Console(stderr=True)
    if args.list_methods:
        list_methods(console)
        return 0
    # Check everything a user can get wrong before loading a model or writing a file.
    methods_text = args.methods or default_methods()
    specs = parse_method_list(methods_text)
    batch_sizes = parse_batch_sizes(args.batch_size)
    prompts = load_prompts(args.prompts, args.limit, args.per_category)
    check_batch_sizes(batch_sizes, len(prompts))
    settings = BenchSettings(max_new_tokens=args.max_new_tokens, turns=args.turns, seed=args.seed,
                             warmup=args.warmup, repeats=args.repeats, chat=not args.no_chat,
                             kl_samples=args.kl_samples, kl_contexts=args.kl_contexts)
    settings.validate()
    from ..config import parse_early_prune

    parse_early_prune(args.early_prune)  # a bad value fails before the model loads
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path("bench-out") / stamp
    if out.exists() and not out.is_dir():
        raise DynTreeError(f"--out {out} exists and is not a folder")

    heads = None if args.heads == "none" else args.heads
    context = BenchContext(model=args.model, heads=heads, device=args.device, weights=args.weights, seed=args.seed,
                           early_prune=args.early_prune)
    settings.weights = context.resolved_weights()  # a bad --weights fails before loading
    with err.status("loading model and methods"):
        if args.methods is None and context.dyntree().heads is None:
            # Default list without heads to run the trees on: time what can run, and say so.
            skipped = [s.text for s in specs if s.name in TREE_METHODS]
            specs = [s for s in specs if s.name not in TREE_METHODS]
            if skipped:
                err.print(f"[yellow]no heads loaded ({context.dyntree().heads_note}): skipping "
                          f"{', '.join(skipped)}; pass --heads DIR or --heads random[/yellow]")
        methods = build_methods(specs, context)
        if args.methods is None and max(batch_sizes) > 1:  # the default list: time the methods that batch
            single = [m.name for m in methods if not hasattr(m, "run_batch")]
            methods = [m for m in methods if hasattr(m, "run_batch")]
            if single:
                err.print(f"[yellow]--batch-size {args.batch_size}: skipping {', '.join(single)} (no batched "
                          "decoding)[/yellow]")
        check_batch_methods(methods, max(batch_sizes))
    sweep = len(batch_sizes) > 1
    runs = []
    for batch_size in batch_sizes:
        settings.batch_size = batch_size
        run_out = out / f"batch{batch_size}" if sweep else out
        bench = _timed_run(methods, prompts, context, settings, args, err, measures_kl, run_benchmark)
        command = _command_line(args, ",".join(s.text for s in specs), run_out, str(batch_size))
        results = collect_results(bench, context, command, args.prompts)
        written = write_outputs(results, run_out, plots=not args.no_plots)
        runs.append(results)
        if not console.is_terminal:
            console = Console(width=160)  # a file or pipe: one line per row, however long the method names
        for table in rich_tables(results):
            console.print(table)
        for line in notes(results):
            console.print(f"[dim]{line}[/dim]")
        console.print(f"wrote {', '.join(written)} to {run_out}/")
    if sweep:
        command = _command_line(args, ",".join(s.text for s in specs), out)
        written = write_sweep(runs, out, command, plots=not args.no_plots)
        console.print((out / written[0]).read_text())
        console.print(f"wrote {', '.join(written)} to {out}/")
    return 0


def _timed_run(methods, prompts, context, settings, args, err, measures_kl, run_benchmark):
    """One benchmark run at `settings.batch_size`, with a progress bar (terminal) or one line per run (log)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..bench.runner import batch_groups

    groups = sum(len(batch_groups(sum(1 for p in prompts if turn < len(p.turns)), settings.batch_size))
                 for turn in range(args.turns))
    total = (groups * args.repeats + args.warmup) * len(methods)
    if args.kl_samples:
        total += sum(measures_kl(m) for m in methods)
    label = f"benchmark (batch {settings.batch_size})"
    if err.is_terminal:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err, transient=True) as bar:
            task = bar.add_task(label, total=total)

            def progress(message: str) -> None:
                bar.update(task, description=message[:60], advance=1)

            return run_benchmark(methods, prompts, context, settings, progress)
    done = 0

    def progress(message: str) -> None:  # a log file: one plain line per run, so a long job can be followed
        nonlocal done
        done += 1
        print(f"[{done}/{total}] {message}", file=sys.stderr, flush=True)

    return run_benchmark(methods, prompts, context, settings, progress)
