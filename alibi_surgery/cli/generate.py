"""``alibi-surgery generate MODEL... --prompts-file F --out DIR``: sampled completions of every prompt by every model
(the paper's generation-quality protocol, :mod:`alibi_surgery.analysis.generation`).

``DIR`` gets one ``<model>.jsonl`` per model (one row per prompt: prompt, seed, completion, token ids, settings; the
name is the model directory's name, with ``-2``, ``-3``... when two models share one) and ``completions.md``, each
prompt followed by every model's completion. ``DIR`` must be new or empty unless ``--overwrite``; it is locked while
the command runs, every file is written atomically, and an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import UsageError
from .options import TEXT_FIELD_HELP, add_model_options, add_texts_file_option

__all__ = ["add_parser", "run", "output_names", "write_markdown"]


def add_parser(sub) -> None:
    from ..analysis.generation import GenerationSettings

    d = GenerationSettings()
    p = sub.add_parser("generate", help="sampled completions of a prompt set by several models (the paper's "
                                        "generation protocol)",
                       description="Complete every prompt with every model: temperature 0.7, top-p 0.92, 100 new "
                                   "tokens, no repetition penalty and a seed per prompt by default; fused attention "
                                   "and the KV cache. One JSONL per model and a side-by-side completions.md.")
    p.add_argument("models", nargs="+", metavar="MODEL", help="model directories or cached hub ids")
    p.add_argument("--out", required=True, help="output directory (new or empty, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="discard what --out holds")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    add_texts_file_option(p, "--prompts-file", "the prompts")
    p.add_argument("--text-field", default="text", metavar="NAME", help=TEXT_FIELD_HELP)
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 decodes greedily")
    p.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling mass (1: off)")
    p.add_argument("--top-k", type=int, default=d.top_k,
                   help="keep the k most likely tokens (0: off); 50 is transformers' default, which the paper's "
                        "generate call inherited")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--seed", type=int, default=d.seed, help="prompt i is sampled with a seed made from this and i")
    add_model_options(p, backends="auto, triton or torch")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _prompts(args) -> list[str]:
    from ..diagnosis.prompts import read_prompts

    prompts = read_prompts(args.prompt, args.prompts_file, field=args.text_field)
    if not prompts:
        raise UsageError("no prompts: give --prompts-file FILE or --prompt TEXT")
    return prompts


def output_names(models: list[str]) -> list[str]:
    """A file stem per model: the directory's name (any script's letters and digits kept, so a non-Latin name stays
    readable; other characters but ``._-`` as ``_``), ``-2``, ``-3``... added to repeats."""
    names, seen = [], {}
    for model in models:
        stem = re.sub(r"[^\w.-]", "_", Path(model.rstrip("/")).name).lstrip(".") or "model"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return names


def _fence(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text}\n{fence}"


def write_markdown(path: Path, models: list[str], names: list[str], results: list[list[dict]], settings) -> None:
    """completions.md: the settings, then each prompt followed by every model's completion."""
    from ..io.files import atomic_write_text

    lines = ["# Completions", "",
             f"Settings: temperature {settings.temperature:g}, top-p {settings.top_p:g}, top-k {settings.top_k}, "
             f"at most {settings.max_new_tokens} new tokens, no repetition penalty, seed {settings.seed} "
             f"(per-prompt seeds in the JSONL files).", "",
             "Models: " + ", ".join(f"`{n}` ({m})" for n, m in zip(names, models)), ""]
    for i, row in enumerate(results[0]):
        lines += [f"## Prompt {i + 1}", "", _fence(row["prompt"]), ""]
        for name, rows in zip(names, results):
            stop = " (stopped at end-of-sequence)" if rows[i]["stop"] == "eos" else ""
            lines += [f"**{name}**{stop}", "", _fence(rows[i]["completion"]), ""]
    atomic_write_text(path, "\n".join(lines))


def run(args) -> None:
    from ..analysis.generation import GenerationSettings, completion_rows, generate_completions
    from ..attention.backends import check_backend
    from ..attention.patch import patch
    from ..io.files import atomic_write_text, filling
    from ..io.loading import load_model, resolve_model_dir
    from ..io.lock import LOCK_NAME, DirLock
    from ..io.outdir import check_out_dir, clear_dir

    settings = GenerationSettings(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                  max_new_tokens=args.max_new_tokens, seed=args.seed).check()
    check_backend(args.backend)
    if args.backend not in ("auto", "triton", "torch"):
        raise UsageError(f"--backend must be auto, triton or torch for generate, got {args.backend!r}")
    prompts = _prompts(args)
    paths = [resolve_model_dir(m) for m in args.models]
    out = None
    for path in paths:  # the input, a run in progress, writability (the emptiness rule follows)
        out = check_out_dir(args.out, path, resume=False, overwrite=True)
    if out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir()) and not args.overwrite:
        raise UsageError(f"--out {out} is not empty: pass --overwrite to replace what it holds")
    names = output_names(args.models)
    results = []
    with DirLock(out):
        if args.overwrite:
            clear_dir(out)
        with filling(out, "--out"):
            for model_name, path, name in zip(args.models, paths, names):
                model, tokenizer = load_model(str(path), dtype=args.dtype, device=args.device)
                patch(model, args.backend)
                rows = generate_completions(model, tokenizer, prompts, settings, progress=not args.quiet, desc=name)
                del model
                text = "".join(json.dumps(r, ensure_ascii=False) + "\n"
                               for r in completion_rows(rows, model_name, settings))
                atomic_write_text(out / f"{name}.jsonl", text)
                results.append(rows)
            write_markdown(out / "completions.md", args.models, names, results, settings)
    for name in names:
        print(f"wrote {out / (name + '.jsonl')}")
    print(f"wrote {out / 'completions.md'}")
