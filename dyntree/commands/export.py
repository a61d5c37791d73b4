"""`dyntree export`: write heads in vLLM's or FasterDecoding's Medusa layout, or eagle heads in EAGLE's (for
SGLang and vLLM) (docs/interop.md)."""

from __future__ import annotations

import warnings
from pathlib import Path


def add_command(subparsers) -> None:
    p = subparsers.add_parser("export", help="write heads for vLLM (vllm-medusa), FasterDecoding Medusa (medusa) or "
                                             "SGLang/vLLM EAGLE (eagle)")
    p.add_argument("--heads", required=True,
                   help="heads directory (dyntree, Medusa v0.1 or vLLM Medusa layout), or 'medusa' for the "
                        "bundled Medusa heads of the default model (the default 'auto'/'hydra' heads read the "
                        "drafted path, which neither format can hold)")
    p.add_argument("--format", required=True, metavar="FORMAT",
                   help="'vllm-medusa' (config.json + model.safetensors for vLLM's speculative_config) or "
                        "'medusa' (FasterDecoding: config.json + medusa_lm_head.safetensors) or 'eagle' (eagle heads "
                        "in EAGLE-1's layout: config.json + model.safetensors, for SGLang and vLLM)")
    p.add_argument("--out", required=True, help="output directory (must be empty or new, unless --force)")
    p.add_argument("--model", default=None,
                   help="the backbone: needed when the heads use its lm_head as their projection (then "
                        "'default' unless given); when given, also checked to fit the heads")
    p.add_argument("--dtype", default="float32", metavar="DTYPE",
                   help="weights' dtype in the files: float32 (default, exact), float16 or bfloat16")
    p.add_argument("--base-model", default=None,
                   help="medusa format: base_model_name_or_path to write (default: the --model directory)")
    p.add_argument("--share-lm-head", action="store_true",
                   help="vllm-medusa with heads that use the backbone's lm_head: write it once with "
                        "original_lm_head: true (vLLM since PR #10454, late 2024) instead of once per head")
    p.add_argument("--pt", action="store_true",
                   help="medusa format: also write medusa_lm_head.pt (FasterDecoding's loader reads only that)")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty --out, replacing the heads files an export writes there")
    p.set_defaults(func=run)


def run(args) -> int:
    from rich.console import Console

    from ..errors import DynTreeError
    from ..interop import DTYPES, EXPORT_FILES, FORMATS, ExportWarning, check_expressible, export_heads, load_heads

    if args.format not in FORMATS:
        raise DynTreeError(f"unknown --format {args.format!r}: choose one of {', '.join(FORMATS)}")
    if args.dtype not in DTYPES:
        raise DynTreeError(f"unknown --dtype {args.dtype!r}: choose one of {', '.join(DTYPES)}")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise DynTreeError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise DynTreeError(f"--out {out} is not empty (pass --force to replace the heads files in it)")
    heads_path = args.heads
    from ..api import bundled_heads_dir, is_bundled_name

    if is_bundled_name(heads_path):
        heads_path = bundled_heads_dir(args.heads)
        if heads_path is None:
            raise DynTreeError(f"this build has no bundled {args.heads} heads; pass a heads directory")
    heads = load_heads(heads_path)
    try:
        check_expressible(heads, args.format)  # before loading a backbone for nothing
    except DynTreeError as exc:
        if is_bundled_name(args.heads):
            raise DynTreeError(f"{exc}; the bundled Medusa heads can be: --heads medusa") from None
        raise
    if args.share_lm_head and (args.format != "vllm-medusa" or heads.projection is not None):
        raise DynTreeError("--share-lm-head applies to the vllm-medusa format and heads that use the backbone's "
                           "lm_head")
    if args.pt and args.format != "medusa":
        raise DynTreeError("--pt applies to the medusa format only")

    lm_head = None
    model_dir = None
    backbone = None
    if heads.projection is None or args.model is not None:
        import torch

        from ..loading import load_model

        loaded = load_model(args.model or "default", dtype=torch.float32)  # the heads' own precision
        heads.config.check_fits(loaded.config)
        lm_head = loaded.backbone.lm_head.weight
        model_dir = loaded.model_dir
        backbone = loaded.backbone

    if args.force and out.is_dir():
        for name in EXPORT_FILES:  # stale files of another layout would decide what a later load reads
            (out / name).unlink(missing_ok=True)
    base_model = args.base_model if args.base_model is not None else (str(model_dir) if model_dir else "")
    with warnings.catch_warnings(record=True) as caught:  # printed below as one line each
        warnings.simplefilter("always", ExportWarning)
        written = export_heads(heads, out, args.format, lm_head_weight=lm_head, dtype=DTYPES[args.dtype],
                               base_model=base_model, share_lm_head=args.share_lm_head, torch_file=args.pt,
                               backbone=backbone)
    console = Console(stderr=True)
    for warning in caught:
        if issubclass(warning.category, ExportWarning):
            console.print(f"warning: {warning.message}", style="yellow", markup=False, soft_wrap=True)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    cfg = heads.config
    if args.format == "eagle":
        console.print(f"wrote an eagle drafter of draft depth {cfg.num_heads} in EAGLE's layout to {written}",
                      soft_wrap=True)
        console.print(f"[dim]SGLang: --speculative-algorithm EAGLE --speculative-draft-model-path {written}; vLLM: "
                      f"speculative_config={{\"method\": \"eagle\", \"model\": \"{written}\", "
                      f"\"num_speculative_tokens\": {cfg.num_heads}}}[/dim]", soft_wrap=True)
        return 0
    subset = f", vocabulary subset of {cfg.vocab_subset}" if cfg.vocab_subset else ""
    layers = f"{cfg.num_layers} block{'s' if cfg.num_layers != 1 else ''}"
    console.print(f"wrote {cfg.num_heads} heads of {layers}{subset} as {args.format} to {written}", soft_wrap=True)
    if args.format == "medusa" and not base_model:
        console.print("[dim]base_model_name_or_path is empty: pass --base-model (or --model) for "
                      "FasterDecoding to find the backbone[/dim]", soft_wrap=True)
    if args.format == "medusa" and not args.pt:
        console.print("[dim]FasterDecoding's MedusaModel.from_pretrained reads only medusa_lm_head.pt: add --pt "
                      "for it[/dim]", soft_wrap=True)
    if args.format == "vllm-medusa":
        console.print(f"[dim]vLLM: speculative_config={{\"method\": \"medusa\", \"model\": \"{written}\", "
                      f"\"num_speculative_tokens\": {cfg.num_heads}}}[/dim]", soft_wrap=True)
    return 0
