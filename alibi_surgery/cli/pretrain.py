"""The pre-training tool's command line: ``python -m alibi_surgery.demo.pretrain OUT [...]`` (the demo model's recipe,
docs/demo-model.md). It is a developer's tool, not an ``alibi-surgery`` command; the training is
:func:`alibi_surgery.demo.pretrain.pretrain`."""

from __future__ import annotations

import argparse
import json

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from ..demo import pretrain

    p = argparse.ArgumentParser(description=pretrain.__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--data", default="recall", choices=["recall", "text"])
    p.add_argument("--corpus", nargs="+")
    p.add_argument("--bos", action="store_true", help="text data: open every window with <s>")
    for name, default in (("layers", 4), ("hidden", 128), ("heads", 8), ("seq-len", 32), ("batch-size", 64),
                          ("warmup", 200), ("steps", 6000), ("diagnose-every", 250), ("seed", 0), ("threads", 0),
                          ("diag-max-length", 0), ("save-every", 0), ("stop-after", 0)):
        p.add_argument(f"--{name}", type=int, default=default)
    for name, default in (("lr", 5e-3), ("weight-decay", 0.0), ("trigger-p", 0.05), ("minutes", 0.0)):
        p.add_argument(f"--{name}", type=float, default=default)
    p.add_argument("--family", default="bloom", choices=["bloom", "llama"],
                   help="llama: the same shape with rotary positions instead of ALiBi (a comparison model)")
    p.add_argument("--short-context", metavar="LEN:STEPS",
                   help="context warm-up: the first STEPS steps at LEN tokens (same tokens per step)")
    p.add_argument("--init-from", metavar="MODEL_DIR",
                   help="a second stage: start from this model's weights (e.g. an earlier run's OUT/last)")
    p.add_argument("--device")
    p.add_argument("--backend", default="eager", help="eager (stock attention), auto, torch or triton")
    p.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--install", action="store_true",
                   help="then install OUT/last as the package's demo model (alibi_surgery/demo/model)")
    return p


def _pair(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        length, steps = (int(v) for v in text.split(":"))
    except ValueError:
        raise SystemExit(f"error: --short-context must be LEN:STEPS (two integers), got {text!r}") from None
    return length, steps


def main(argv=None) -> int:
    from ..demo import install_model
    from ..demo.pretrain import pretrain
    from ..io.loading import DTYPES

    from ..errors import UsageError
    from .console import flag_wording

    parser = build_parser()
    a = parser.parse_args(argv)
    if a.family != "bloom" and (a.install or a.backend != "eager"):
        raise SystemExit("error: --family llama trains with the stock attention and is never installed as the demo")
    try:
        result = _pretrain(pretrain, a, DTYPES)
    except UsageError as exc:  # the library names its arguments; here they are the flags
        raise SystemExit(f"error: {flag_wording(str(exc), parser)}") from None
    print(json.dumps(result))
    if a.install:
        print(f"installed the demo model in {install_model(a.out)}")
    return 0


def _pretrain(pretrain, a, DTYPES) -> dict:
    """``pretrain`` with the options of ``a``."""
    return pretrain(a.out, data=a.data, corpus=a.corpus, trigger_p=a.trigger_p, bos=a.bos, layers=a.layers,
                    hidden=a.hidden, heads=a.heads, seq_len=a.seq_len, batch_size=a.batch_size, lr=a.lr,
                    weight_decay=a.weight_decay, warmup=a.warmup, steps=a.steps or None,
                    minutes=a.minutes or None, diagnose_every=a.diagnose_every, save_every=a.save_every or None,
                    diag_max_length=a.diag_max_length or None, device=a.device, threads=a.threads or None,
                    seed=a.seed, backend=a.backend, save_dtype=DTYPES[a.save_dtype], family=a.family,
                    short_context=_pair(a.short_context), stop_after=a.stop_after or None,
                    init_from=a.init_from)
