"""``alibi-surgery plan-memory MODEL|SHAPE``: predicted peak memory of diagnosis and surgery, against a budget."""

from __future__ import annotations

import sys

from .options import add_output_options

__all__ = ["add_parser", "run", "ARGUMENT_NAMES"]

# plan_memory's arguments named otherwise here (errors name the Python argument; the CLI prints the option)
ARGUMENT_NAMES = {"batch": "batch_size", "n_prompts": "prompts"}


def add_parser(sub) -> None:
    p = sub.add_parser("plan-memory", help="predict peak memory of diagnosis and surgery; does it fit a budget?",
                       description="Predicted peak device memory, by part, for an in-memory and a streamed "
                                   "diagnosis and for one surgery step (see docs/scale.md).")
    p.add_argument("model", help="model directory, cached hub id, or a family shape (bloom-560m ... bloom)")
    p.add_argument("--heads", default="auto", help="heads to train: a number, or auto (the paper's collapse share)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--prompts", type=int, default=8, help="prompts a diagnosis keeps hidden states for (8)")
    p.add_argument("--dtype", default="bfloat16", help="float32, bfloat16 or float16 (default bfloat16)")
    p.add_argument("--stochastic-rounding", action="store_true", help="bf16 surgery without an fp32 master copy")
    p.add_argument("--budget", help="memory to check against, e.g. 24GiB or 16GB")
    p.add_argument("--device", default="cuda", help="cuda (a card; default) or cpu (adds the loading cost there)")
    p.add_argument("--world-size", type=int, metavar="N",
                   help="also predict per rank over N devices: data-parallel diagnosis, FSDP2 surgery step")
    p.add_argument("--device-memory", metavar="SIZE",
                   help="memory of each of the N devices, e.g. 80GiB: which jobs fit, and the smallest world size "
                        "for the surgery step")
    add_output_options(p, json=("OUT", "write the prediction as JSON"))
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")


def run(args) -> int:
    import json

    from ..io.files import atomic_write_text, check_output_paths
    from ..surgery.memory_plan import does_not_fit, format_bytes, format_plan, parse_bytes, plan_memory

    from ..errors import UsageError
    from ..surgery.rank_memory import format_ranks, plan_ranks

    if args.device_memory and args.world_size is None:
        raise UsageError("--device-memory is the memory of each of --world-size N devices: give --world-size too")
    if args.world_size is not None and args.world_size < 1:
        raise UsageError(f"--world-size {args.world_size}: must be >= 1")
    out = check_output_paths({"json": args.json}, overwrite=args.overwrite).get("json")
    budget = parse_bytes(args.budget) if args.budget else None
    device_memory = parse_bytes(args.device_memory) if args.device_memory else None
    prediction = plan_memory(args.model, heads=args.heads, seq_len=args.seq_len, batch=args.batch_size,
                             dtype=args.dtype, budget=budget, n_prompts=args.prompts,
                             stochastic_rounding=args.stochastic_rounding, device=args.device)
    ranks = None
    if args.world_size is not None:
        ranks = prediction["ranks"] = plan_ranks(args.model, world_size=args.world_size, device_memory=device_memory,
                                                 heads=args.heads, seq_len=args.seq_len, batch=args.batch_size,
                                                 dtype=args.dtype, n_prompts=args.prompts)
    if out:
        atomic_write_text(out, json.dumps(prediction, indent=2) + "\n")
    print(format_plan(prediction))
    if ranks:
        print(format_ranks(ranks))
    if out:
        print(f"wrote {out}")
    missing = does_not_fit(prediction)
    if missing:  # the answer to "does it fit?" is the exit status too
        print(f"error: {' and '.join(missing)} does not fit --budget {format_bytes(budget)}", file=sys.stderr)
        return 1
    missing = does_not_fit(ranks) if ranks else []
    if missing:
        print(f"error: {' and '.join(missing)} does not fit --device-memory {format_bytes(device_memory)} on each of "
              f"{args.world_size} device(s)", file=sys.stderr)
        return 1
    return 0
