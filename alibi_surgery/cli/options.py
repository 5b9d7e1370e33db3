"""Command-line options shared by several subcommands (diagnose, family, repair, compare), and the prompt list they
resolve to."""

from __future__ import annotations

__all__ = ["add_model_options", "add_prompt_options", "add_diagnosis_options", "add_output_options",
           "add_healthy_option", "add_texts_file_option", "add_corpus_options", "corpus_spec", "prompts_from_args",
           "TEXT_FIELD_HELP"]


def add_model_options(p, *, backends: str = "auto, triton, torch or eager") -> None:
    """--device, --dtype, --backend."""
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", help="float32, float16 or bfloat16 (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--backend", default="auto", help=f"{backends} (default: auto)")


def add_prompt_options(p, *, exclude_help: str = "leave query row 0 (whose first-token mass is always 1) out of "
                                                  "the averages") -> None:
    """--prompt, --prompts-file, --text-field, --batch-size, --max-length, --exclude-first-query,
    --normalize-entropy."""
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    add_texts_file_option(p, "--prompts-file", "prompts")
    p.add_argument("--text-field", default="text", metavar="NAME", help=TEXT_FIELD_HELP)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, help="truncate prompts to this many tokens")
    p.add_argument("--exclude-first-query", action="store_true", help=exclude_help)
    p.add_argument("--normalize-entropy", action="store_true", help="divide each row's entropy by ln(visible keys)")


TEXT_FIELD_HELP = "the field holding each text in .jsonl/.json files (default: text)"


def add_texts_file_option(p, flag: str, what: str, extra: str = "") -> None:
    """A ``flag FILE`` option taking a list of texts, as :func:`~alibi_surgery.io.texts.read_texts` reads it."""
    p.add_argument(flag, metavar="FILE", help=f"{what}: a .txt file, one per line; a .jsonl file, one JSON object per "
                                              f"line ({{\"text\": ...}}, or --text-field); or a .json list of strings "
                                              f"or objects: texts with newlines stay whole{extra}")


def add_output_options(p, **outputs: tuple[str, str]) -> None:
    """One ``--NAME METAVAR`` option per keyword, in order: ``json=("OUT", "write the report as JSON")``."""
    for name, (metavar, text) in outputs.items():
        p.add_argument(f"--{name}", metavar=metavar, help=text)


def add_healthy_option(p) -> None:
    """--healthy ours|paper: which heads a healthy count counts (alibi_surgery.diagnosis.healthy); checked there."""
    p.add_argument("--healthy", default="ours", metavar="DEF",
                   help="which heads count as healthy: ours (neither dead nor bos-sink; low-entropy heads count, "
                        "the default) or paper (the healthy class only: not dead, bos-sink or low-entropy, as the "
                        "paper's evaluate_epoch3.py); the classes do not change (docs/metrics.md)")


def add_diagnosis_options(p) -> None:
    """--overwrite, prompts, model, thresholds, --stream and --quiet: shared by diagnose and family."""
    p.add_argument("--overwrite", action="store_true", help="replace output files that already exist")
    add_prompt_options(p)
    add_model_options(p)
    p.add_argument("--dead-threshold", type=float, default=0.95, help="bos_mass above this is dead (0.95)")
    p.add_argument("--sink-threshold", type=float, default=0.50, help="bos_mass above this is a bos-sink (0.50)")
    p.add_argument("--low-entropy-threshold", type=float, default=0.50,
                   help="entropy below this is low-entropy (0.50)")
    p.add_argument("--stream", action="store_true",
                   help="read and run one block at a time from the safetensors files (one block in memory); "
                        "chosen automatically when the whole model would not fit in free memory")
    p.add_argument("--dormancy-threshold", type=float, default=0.01,
                   help="an MLP neuron with ||up row|| x ||down column|| below this is dormant (0.01)")
    p.add_argument("--dormant-fraction", type=float, default=0.1,
                   help="a head whose output norm is below this fraction of its layer's median head is flagged "
                        "dormant (0.1; docs/metrics.md)")
    p.add_argument("--sink-epsilon", type=float, default=0.3,
                   help="a head is a first-token sink on a prompt when the first token's attention, averaged over "
                        "every query row, exceeds this (Gu et al.'s sink rate; 0.3)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def prompts_from_args(args) -> list[str]:
    """The prompts ``--prompt`` and ``--prompts-file`` (read by ``--text-field``) give, or the built-in set when they
    give none."""
    from ..diagnosis.prompts import DEFAULT_PROMPTS, read_prompts

    return read_prompts(args.prompt, args.prompts_file, field=getattr(args, "text_field", "text")) or \
        list(DEFAULT_PROMPTS)


def add_corpus_options(p) -> None:
    """--no-eos and --max-tokens: how ``--corpus`` documents are packed (:class:`~alibi_surgery.io.corpus.CorpusSpec`)."""
    p.add_argument("--no-eos", action="store_true",
                   help="join documents without an end-of-text token (only the tokenizer's own framing, e.g. a <s> "
                        "prefix): for a model whose pre-training never showed it </s>; also for --eval-text")
    p.add_argument("--max-tokens", type=int, metavar="N",
                   help="train on the first N tokens of the corpus only, read in order (reading stops there)")


def corpus_spec(args, paths, *, capped: bool = True):
    """The :class:`~alibi_surgery.io.corpus.CorpusSpec` of ``paths`` with ``--text-field``, ``--split``, ``--no-eos``
    and (``capped``) ``--max-tokens``; None when ``paths`` is empty."""
    from ..io.corpus import CorpusSpec

    if not paths:
        return None
    return CorpusSpec(tuple(str(p) for p in paths), text_field=args.text_field, split=getattr(args, "split", None),
                      eos=not getattr(args, "no_eos", False),
                      max_tokens=getattr(args, "max_tokens", None) if capped else None)
