"""Command-line options shared by several subcommands (diagnose, repair, compare)."""

from __future__ import annotations

__all__ = ["add_model_options", "add_prompt_options"]


def add_model_options(p, *, backends: str = "auto, triton, torch or eager") -> None:
    """--device, --dtype, --backend."""
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", help="float32, float16 or bfloat16 (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--backend", default="auto", help=f"{backends} (default: auto)")


def add_prompt_options(p, *, exclude_help: str = "leave query row 0 (whose first-token mass is always 1) out of "
                                                  "the averages") -> None:
    """--prompt, --prompts-file, --batch-size, --max-length, --exclude-first-query, --normalize-entropy."""
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", metavar="FILE", help="a file with one prompt per line")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, help="truncate prompts to this many tokens")
    p.add_argument("--exclude-first-query", action="store_true", help=exclude_help)
    p.add_argument("--normalize-entropy", action="store_true", help="divide each row's entropy by ln(visible keys)")
