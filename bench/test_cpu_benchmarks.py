"""CPU benchmarks with pytest-benchmark: ``pytest bench/ --benchmark-only`` (not part of the unit-test run).

Small shapes, so the whole file takes a few minutes on 2 cores: each op's GPU-sized figures come from its script.
Every test appends its median to ``bench/results/<op>.csv`` (see conftest.py), which ``bench/plot.py`` renders.
"""

from __future__ import annotations

import pytest
import torch

from attention import Case, Inputs, make

PEDANTIC = dict(rounds=3, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("provider", ["eager", "torch"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
def test_attention(benchmark, record, provider, backward):
    case = Case("bloom-560m", 512, 1, "float32", "cpu")
    x = Inputs(case, requires_grad=backward)
    with torch.set_grad_enabled(backward):
        fn = make(provider, case, x)
        benchmark.pedantic((lambda: fn().backward(x.do)) if backward else fn, **PEDANTIC)
    tflops = case.flops(backward) / benchmark.stats.stats.median / 1e12
    record("attention_fwd_bwd" if backward else "attention_fwd",
           dict(**case.row(), provider=provider, mode="fwd+bwd" if backward else "fwd", stats=False,
                tflops=round(tflops, 4)))


@pytest.mark.parametrize("with_stats", [False, True], ids=["plain", "stats"])
def test_stats_overhead(benchmark, record, with_stats):
    case = Case("bloom-560m", 512, 1, "float32", "cpu")
    x = Inputs(case, requires_grad=False)
    with torch.no_grad():
        benchmark.pedantic(make("torch", case, x, with_stats=with_stats), rounds=5, warmup_rounds=1)
    record("stats_overhead", dict(**case.row(), provider="torch", mode="fwd", stats=with_stats))


@pytest.mark.parametrize("provider", ["head-sliced", "torch-adamw-full"])
def test_optimizer_step(benchmark, record, provider):
    from types import SimpleNamespace

    from bench_optimizer import bandwidth_figures, build, bytes_moved, copy_bandwidth, full_matrices, selection

    from alibi_surgery import HeadSlicedAdamW, HeadSlices

    args = SimpleNamespace(shape="bloom-560m", layers=4, dtype="float32", device="cpu")
    model, config = build(args)
    sel = selection(config.n_layer, config.n_head, 16)
    if provider == "head-sliced":
        slices = HeadSlices(model, sel)
        opt = HeadSlicedAdamW(slices, lr=1e-4, weight_decay=0.01)
        slices.grad.normal_()
        elements, moved, state = slices.numel, bytes_moved(opt), opt.state_bytes
    else:
        params = full_matrices(model, sel)
        for t in params:
            t.grad = torch.randn_like(t)
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
        elements = sum(t.numel() for t in params)
        moved, state = elements * 4 * 7, elements * 8
    benchmark.pedantic(opt.step, rounds=5, warmup_rounds=1)
    figures = bandwidth_figures(benchmark.stats.stats.median * 1e3, moved, copy_bandwidth("cpu"))
    del figures["opt_ms"]  # record() adds the median itself
    record("optimizer", dict(shape=args.shape, layers=config.n_layer, heads=16, dtype=args.dtype, provider=provider,
                             mode="fp32" if provider == "head-sliced" else "foreach", elements=elements,
                             state_gb=round(state / 1e9, 4), **figures), ms_key="opt_ms")


@pytest.mark.parametrize("provider", ["chunked", "full"])
def test_loss(benchmark, record, provider):
    from bench_loss import predicted_bytes

    from alibi_surgery import chunked_lm_loss
    from alibi_surgery.analysis.loss import default_chunk_tokens

    tokens, hidden, vocab = 512, 1024, 250_880
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(1, tokens, hidden, generator=gen, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=gen) * 0.02
    labels = torch.randint(0, vocab, (1, tokens), generator=gen)

    def step():
        if provider == "chunked":
            loss = chunked_lm_loss(h, w, labels)
        else:
            logits = (h @ w.T)[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), labels[:, 1:].reshape(-1))
        loss.backward()
        h.grad = None

    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    record("loss", dict(provider=provider, device_kind="cpu", batch=1, seq=tokens, hidden=hidden, vocab=vocab,
                        dtype="float32", pred_gb=round(predicted_bytes(provider, tokens, vocab, hidden, 4,
                                                       min(default_chunk_tokens(vocab), tokens - 1)) / 1e9, 3)),
           ms_key="seconds", scale=1.0)


@pytest.mark.parametrize("provider", ["eager", "torch"])
def test_diagnose(benchmark, record, provider):
    from bench_diagnose import _one

    row = {}  # _one builds the model, then times one diagnosis pass itself (that is the row's "seconds")
    benchmark.pedantic(lambda: row.update(_one("bloom-560m", 512, provider, 4096)), rounds=1, iterations=1)
    record("diagnose", dict(row, vocab=4096), ms_key="build_and_diagnose_seconds", scale=1.0)


def test_diagnose_ratio(benchmark, record):
    """The issue's CPU goal, diagnose with the torch backend at most 0.7x eager ``output_attentions``: bloom-560m
    shape at T = 2048, both in this process, interleaved (a few minutes on 2 cores; no assertion, it prints)."""
    from bench_diagnose import same_process_ratio

    row = {}
    benchmark.pedantic(lambda: row.update(same_process_ratio("bloom-560m", 2048, rounds=2)), rounds=1, iterations=1)
    print(f"\nbloom-560m T=2048 diagnose torch/eager time {row['ratio']:.3f} (medians {row['torch_seconds']:.2f} s / "
          f"{row['eager_seconds']:.2f} s; rounds: eager {row['eager_rounds']}, torch {row['torch_rounds']})")
    record("diagnose_ratio", row, ms_key="bench_seconds", scale=1.0)


def test_train_step(benchmark, record):
    from types import SimpleNamespace

    from bench_train_step import build_model, selection_for

    from alibi_surgery import HeadSlicedAdamW, HeadSlices, chunked_lm_loss

    args = SimpleNamespace(shape="bloom-560m", layers=2, vocab=4096, dtype="float32", device="cpu", backend="torch",
                           selection="spread", heads=8)
    model, config = build_model(args)
    slices = HeadSlices(model, selection_for(args, config.n_layer, config.n_head))
    opt = HeadSlicedAdamW(slices, lr=1e-4, max_grad_norm=1.0)
    ids = torch.randint(0, config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(1))

    def step():
        loss = chunked_lm_loss(model.transformer(ids).last_hidden_state, model.lm_head.weight, ids)
        loss.backward()
        opt.step()

    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    record("train_step", dict(method="sliced", shape="bloom-560m", layers=2, vocab=4096, dtype="float32",
                              device_kind="cpu", seq=128, batch=1, heads=8, rounding="fp32"), ms_key="seconds",
           scale=1.0)
