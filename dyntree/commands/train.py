"""`dyntree train`: fit Medusa heads on a `dyntree distill` dataset (backbone frozen; runs under accelerate)."""

from __future__ import annotations

import json


def add_command(subparsers) -> None:
    from ..training.train import TrainConfig

    d = TrainConfig()
    p = subparsers.add_parser("train", help="train Medusa heads on a self-distilled dataset",
                              description="Multi-process: accelerate launch --num_processes N -m dyntree.cli train ...")
    p.add_argument("--data", required=True, nargs="+",
                   help="dataset directories written by `dyntree distill` (several train as one mixed set, e.g. "
                        "self-distilled + teacher-forced)")
    p.add_argument("--out", required=True, help="output directory: heads.json + heads.safetensors, checkpoints/, report")
    p.add_argument("--num-heads", type=int, default=d.num_heads, help="K heads (>= the trees' depth)")
    p.add_argument("--num-layers", type=int, default=d.num_layers, help="residual blocks per head")
    p.add_argument("--own-projection", action="store_true",
                   help="each head gets its own vocabulary projection (default: share the backbone's lm_head)")
    p.add_argument("--vocab-subset", type=int, default=d.vocab_subset,
                   help="project onto the N most frequent response tokens only (0 = whole vocabulary)")
    p.add_argument("--epochs", type=float, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="tokens per optimiser step (all processes)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    p.add_argument("--decay", type=float, default=d.decay, help="loss weight of head k is decay**k")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction, help="held-out share of the sequences")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="optimiser steps (0 = never)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="optimiser steps (0 = once per epoch)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-stored-hidden", action="store_true",
                   help="recompute the backbone's hidden states from the token ids instead of reading them")
    p.add_argument("--stop-after", type=int, default=None,
                   help="checkpoint and stop after this many optimiser steps (run again to continue)")
    p.add_argument("--init-heads", default=None, metavar="DIR",
                   help="continue from trained heads (same --num-heads/--num-layers/projection), e.g. after "
                        "distilling more data; the vocabulary subset is chosen anew and rows move with tokens")
    p.add_argument("--head-type", choices=["medusa", "hydra", "eagle"], default=d.head_type,
                   help="medusa: each head reads the hidden state; hydra: also the embeddings of the drafted path "
                        "(trained teacher-forced; --init-heads may be Medusa heads of the same shape); eagle: one "
                        "decoder layer drafting features over the whole context (--num-heads = draft depth, "
                        "--num-layers 1; one process, no checkpoints)")
    p.add_argument("--feature-loss", type=float, default=d.feature_loss, metavar="W",
                   help="eagle: weight of smooth L1 between the drafted and the backbone's next feature, added to "
                        "the cross-entropy (EAGLE's recipe is 10, i.e. 1.0 vs 0.1)")
    p.add_argument("--unroll", type=int, default=d.unroll, metavar="K",
                   help="eagle: train K draft steps at once, each fed the drafter's own features as decoding "
                        "feeds them (EAGLE-3's training-time test; step k weighted --decay**(k-1)); 1 = EAGLE-1")
    p.add_argument("--soft-targets", type=float, default=d.soft_targets, metavar="A",
                   help="weight in [0, 1] of the backbone's whole distribution in the loss (0 = its argmax only)")
    p.add_argument("--hidden-noise", type=float, default=d.hidden_noise,
                   help="Gaussian noise on the heads' input state, relative to its RMS (regularises)")
    p.add_argument("--dropout", type=float, default=d.dropout, help="dropout on the heads' input state")
    p.add_argument("--fp16-blocks", action="store_true", help="store the heads' blocks in fp16 (half the size)")
    p.add_argument("--int8-projection", action="store_true",
                   help="store the own projections as int8 with a scale per row (half the size again)")
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints in --out and start over")
    p.add_argument("--early-layer", type=int, default=None, metavar="L",
                   help="instead of heads: train ProPD's early head for pruning after layer L (an adapter before "
                        "the frozen final norm + lm_head, on layer-L states recomputed from the token ids); "
                        "--out: the heads directory it serves (writes early_head.json/.safetensors there; ranks "
                        "over those heads' vocabulary subset, as pruning does); uses --epochs, --lr, --batch-size, "
                        "--val-fraction, --seed")
    p.add_argument("--model", default="default", help="'default' or a local Hugging Face model directory")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (per process)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import DynTreeError
    from ..extras import require_extra

    require_extra("train", "dyntree train")  # before the training code (and the model) loads
    from ..loading import load_model
    from ..training.train import TrainConfig, train

    if not 0 <= args.val_fraction < 1:
        raise DynTreeError("--val-fraction must be in [0, 1)")
    if args.vocab_subset < 0:
        raise DynTreeError("--vocab-subset must be >= 0")
    if not 1 <= args.unroll <= args.num_heads:
        raise DynTreeError("--unroll must be between 1 and --num-heads (the draft depth)")
    data = args.data if len(args.data) > 1 else args.data[0]
    if args.early_layer is not None:
        if len(args.data) > 1:
            raise DynTreeError("--early-layer trains on one dataset: give one --data directory")
        from ..training.early_head import train_early_head

        loaded = load_model(args.model, device=args.device)
        report = train_early_head(loaded, data, args.out, args.early_layer, epochs=args.epochs, lr=args.lr,
                                  batch_size=args.batch_size, val_fraction=args.val_fraction, seed=args.seed)
        print(json.dumps(report, indent=2))
        return 0
    if args.int8_projection and not args.own_projection:
        raise DynTreeError("--int8-projection stores own projections: add --own-projection (the shared lm_head "
                           "is not saved with the heads)")
    config = TrainConfig(
        num_heads=args.num_heads, num_layers=args.num_layers, shared_projection=not args.own_projection,
        vocab_subset=args.vocab_subset, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, decay=args.decay,
        val_fraction=args.val_fraction, seed=args.seed, checkpoint_every=args.checkpoint_every,
        eval_every=args.eval_every, use_stored_hidden=not args.no_stored_hidden, init_heads=args.init_heads,
        head_type=args.head_type, soft_targets=args.soft_targets, hidden_noise=args.hidden_noise,
        dropout=args.dropout, feature_loss=args.feature_loss, unroll=args.unroll)
    import torch
    from accelerate import Accelerator

    # One process per device under `accelerate launch`; CPU unless a GPU is asked for or auto-detected.
    accelerator = Accelerator(cpu=args.device == "cpu" or (args.device is None and not torch.cuda.is_available()))
    loaded = load_model(args.model, device=accelerator.device)
    report = train(loaded, data, args.out, config, resume=not args.no_resume, stop_after=args.stop_after,
                   block_dtype=torch.float16 if args.fp16_blocks else torch.float32, accelerator=accelerator,
                   int8_projection=args.int8_projection)
    from accelerate.state import PartialState

    if "stopped_at" in report:
        if PartialState().is_main_process:
            print(f"stopped at step {report['stopped_at']} of {report['total_steps']}; run the same command to resume")
        return 0
    if PartialState().is_main_process:
        print(json.dumps({k: report[k] for k in ("data", "vocab_subset_coverage", "steps", "processes",
                                                 "wall_seconds", "validation")}, indent=2))
    return 0
