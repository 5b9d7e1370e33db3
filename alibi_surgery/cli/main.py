"""The ``alibi-surgery`` command line.

    alibi-surgery diagnose MODEL [--prompt TEXT ...] [--prompts-file F] [--json OUT] [--csv OUT] [--heatmap PNG]
                           [--histogram PNG]
    alibi-surgery random-model DIR [--shape tiny|bloom-560m|...] [--layers N] [--vocab N]
    alibi-surgery repair MODEL --out DIR --corpus TEXT... [--heads auto|SPEC] [--band A-B --layers C-D] [...]
    alibi-surgery compare A B [--json OUT] [--heatmap PNG] [--table]
    alibi-surgery compare STOCK A B ... --panels OUT.png [--panel-scale 0.4] [--annotate-threshold 0.15]
    alibi-surgery demo [--out DIR] [--overwrite]
    alibi-surgery family DIR... [--json OUT] [--heatmap PNG] [--markdown OUT.md] [--stream]
    alibi-surgery plan-memory MODEL|SHAPE [--heads N|auto] [--seq-len T] [--batch-size B] [--budget 24GiB]
    alibi-surgery perplexity MODEL... (--prompts-file F | --text F) [--convention tokens|paper] [--json OUT]
    alibi-surgery drift RUN_DIR [--json OUT] [--heatmap PNG] [--trajectories PNG]
    alibi-surgery generate MODEL... --prompts-file F --out DIR [--temperature 0.7] [--top-p 0.92] [--seed 42]
    alibi-surgery ablate MODEL --heads SPEC (--prompts-file F | --text F) [--json OUT] [--mode zero|mean|both]
                         [--floor-draws 20] [--seed 0] [--bootstrap 1000]
    alibi-surgery paper MODEL --paper-repo DIR --out OUT [--corpus ...] [--c4 ...] [--arms ...] [--dry-run]

Every bad input ends with a one-line ``error: ...`` on stderr and exit status 2, before anything is written; a
write failure (a full disk, a file-size limit) with one line naming the path and exit status 1; Ctrl-C with status
130. A stopped ``repair`` names its last complete checkpoint and the ``--resume`` command that continues it.
``--debug`` (before or after the command) shows the traceback instead. Output files are written before anything is
printed, and a closed standard output (``| head``) costs nothing but the text. Warnings are one ``warning:`` line.
"""

from __future__ import annotations

import argparse
import sys

from . import (ablate, compare, demo, diagnose, drift, family, generate, paper, perplexity, plan_memory, random_model,
               repair, sparsify)
from ..distributed import close as close_ranks, init_from_env, is_main, world
from .console import Terminated, flag_wording, resume_hint, setup_console, word_warnings
from ..errors import RankFailed, UsageError, WriteError

__all__ = ["main", "build_parser", "COMMANDS"]

# Every command, in the order ``--help`` lists them: its module has ``add_parser(sub)`` and ``run(args)``.
COMMANDS = {"diagnose": diagnose, "random-model": random_model, "repair": repair, "compare": compare, "demo": demo,
            "family": family, "plan-memory": plan_memory, "perplexity": perplexity, "drift": drift,
            "generate": generate, "ablate": ablate, "paper": paper, "sparsify": sparsify}


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the text already gives it or there is none."""

    def _get_help_string(self, action):
        text = action.help or ""
        hidden = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if not action.option_strings or hidden or "default" in text:
            return text
        return f"{text} (default: {action.default})"


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="alibi-surgery", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"alibi-surgery {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        module.add_parser(sub)
    for p in sub.choices.values():  # --debug after the command too; defaults in every --help
        p.formatter_class = _HelpFormatter
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return parser


def _command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _quiet_transformers() -> None:
    """Our own progress bar and one-line errors only: no transformers warnings or loading bars on the terminal, and
    none from Hugging Face's kernels package (transformers >= 5.25 imports it; offline, as every command here runs,
    it warns that it skips a publisher trust check each time a modeling module registers its hub kernels)."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("kernels").setLevel(logging.ERROR)


SIZE_OPTIONS = ("--budget",)  # options whose value may be mistyped as negative: "-1GiB" must reach their check


def _negative_values(argv: list[str]) -> list[str]:
    """``--budget -1GiB`` as ``--budget=-1GiB``: argparse would read ``-1GiB`` as an unknown option and print its
    usage; joined, the value reaches the option's own one-line refusal."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in SIZE_OPTIONS and i + 1 < len(argv) and argv[i + 1][:2].startswith("-") \
                and argv[i + 1][1:2].isdigit():
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    argv = _negative_values(list(sys.argv[1:] if argv is None else argv))
    setup_console()
    parser = build_parser()
    args = parser.parse_args(argv)
    command = _command_parser(parser, args.command)
    names = getattr(COMMANDS[args.command], "ARGUMENT_NAMES", None)  # the command's Python arguments named otherwise
    word_warnings(command, names)
    _quiet_transformers()
    main_rank, owned = True, False
    try:
        # under torchrun: this process is one rank of WORLD_SIZE (a group of one for --distributed without it)
        owned = init_from_env(single=getattr(args, "distributed", "none") == "fsdp")
        main_rank = is_main()
        _check_ranks(args)
        code = COMMANDS[args.command].run(args)
    except (UsageError, WriteError, RankFailed) as exc:
        if args.debug:
            raise
        if main_rank or isinstance(exc, WriteError):  # every rank meets the same bad input: rank 0 says it
            message = flag_wording(str(exc), command, names)  # the library's words as the command's flags
            print(f"error: {message}{resume_hint(exc, argv)}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    except KeyboardInterrupt as exc:
        if args.debug:
            raise
        terminated = isinstance(exc, Terminated)
        print(f"error: {'terminated' if terminated else 'interrupted'}{resume_hint(exc, argv)}", file=sys.stderr)
        return 143 if terminated else 130
    finally:
        if owned:
            close_ranks()
    return code if isinstance(code, int) else 0


def _ranked(args) -> bool:
    """Whether this invocation runs as ranks: the command's ``DISTRIBUTED`` (True, or a function of the args)."""
    allowed = getattr(COMMANDS[args.command], "DISTRIBUTED", False)
    return bool(allowed(args) if callable(allowed) else allowed)


def _check_ranks(args) -> None:
    """In a process group of several ranks (torchrun), refuse a command that does not split its work over ranks and
    silence stdout and warnings on every rank but 0."""
    command = args.command
    if world()[1] == 1:
        return
    if not _ranked(args):
        ranked = ", ".join(name for name, module in COMMANDS.items() if getattr(module, "DISTRIBUTED", False) is True)
        raise UsageError(f"{command} runs in one process, not under torchrun (WORLD_SIZE={world()[1]}); "
                         f"{ranked} split their prompts over ranks; repair trains over them with --distributed fsdp")
    if is_main():
        return
    import os
    import warnings

    sys.stdout = open(os.devnull, "w")
    warnings.simplefilter("ignore")


if __name__ == "__main__":
    sys.exit(main())
