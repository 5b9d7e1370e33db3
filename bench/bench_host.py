"""Host-side cost of one attention call: the Python and dispatch work around the kernel launches, on a CPU.

    python bench/bench_host.py [--providers triton triton-packed api baseline baseline-packed] [--calls 3000]

At small shapes (decode steps, the 560m shape at T = 512) a GPU finishes the kernels before the host has issued
the next call, so the host's time per call is the time per call. This measures it without a GPU: the Triton
launches are replaced by no-ops (what is left is argument checks, buffer allocation, the custom-operator or
autograd dispatch and the autograd engine), on tiny CPU tensors (B = 1, H = 4, T = 16, d = 64, bf16) so that the
few torch operations cost nothing, one thread, the best of 5 runs of ``--calls`` calls. Launch-argument handling
inside Triton itself (a few microseconds per launch on a GPU) is not counted. Providers are those of
``bench/attention.py`` (``baseline``: the kernels of ``bench/.baseline``) and ``api``, the public
``alibi_attention`` with no mask. Rows go to bench/results/host_overhead.csv.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def stub_gpu() -> None:
    """No-op Triton launches, and a CUDA capability for the launchers' tile choice (sm_90)."""
    from triton.runtime.jit import JITFunction

    JITFunction.run = lambda self, *args, **kwargs: None
    torch.cuda.get_device_capability = lambda *args: (9, 0)


def per_call_us(fn, calls: int) -> float:
    for _ in range(50):
        fn()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--providers", nargs="+", default=["triton", "triton-packed", "api", "baseline", "baseline-packed"])
    p.add_argument("--calls", type=int, default=3000)
    args = p.parse_args(argv)
    stub_gpu()
    torch.set_num_threads(1)
    import attention as A
    from common import append_rows

    A.FAMILY["host-probe"] = (4, 64)
    case = A.Case("host-probe", 16, 1, "bfloat16", "cpu")
    rows, lines = [], ["| provider | forward (no grad) | forward (grad) | forward + backward |", "|---|---|---|---|"]
    for provider in args.providers:
        times = {}
        for mode in ("fwd", "fwd-grad", "fwd+bwd"):
            grad = mode != "fwd"
            x = A.Inputs(case, requires_grad=grad, packed=provider.endswith("-packed"))
            with torch.set_grad_enabled(grad):
                if provider == "api":
                    import alibi_surgery.attention.functional as functional
                    from alibi_surgery import alibi_attention

                    functional.resolve_backend = lambda *a: "triton"  # a CPU tensor through the stubbed kernels

                    q, k, v = (t.transpose(1, 2) for t in (x.q, x.k, x.v))
                    fn = lambda: alibi_attention(q, k, v, backend="triton")  # noqa: E731
                else:
                    fn = A.make(provider, case, x)
                call = (lambda: fn().backward(x.do)) if mode == "fwd+bwd" else fn
                try:
                    times[mode] = per_call_us(call, args.calls // (3 if mode == "fwd+bwd" else 1))
                except Exception as exc:  # noqa: BLE001 - a provider that is missing (no baseline) is reported
                    print(f"{provider}: {exc}")
                    break
        if len(times) == 3:
            rows.append(dict(provider=provider, **{f"{m}_us": round(t, 1) for m, t in times.items()}))
            print(json.dumps(rows[-1]), flush=True)
            lines.append(f"| {provider} | " + " | ".join(f"{times[m]:.0f} us" for m in times) + " |")
    append_rows("host_overhead", rows)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
