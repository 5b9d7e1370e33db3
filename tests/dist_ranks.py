"""Rank processes for the distributed tests (importable by ``torch.multiprocessing.spawn``'s children, which get the
parent's sys.path): each joins a gloo group on a file store, runs its jobs and writes what it saw as JSON."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path


def _join(rank: int, world_size: int, store: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)  # the reference runs single-threaded too: the same per-batch float32 sums
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)


def diagnosis_ranks(rank: int, world_size: int, store: str, model: str, prompts: list, out: str) -> None:
    """In memory, streamed and through the CLI (``diagnose --json``); then ``repair``, which refuses to run as
    ranks, and a CLI diagnosis in which rank 1 fails."""
    import torch.distributed as dist

    from alibi_surgery.cli.main import main
    from alibi_surgery.diagnosis import diagnose as diagnose_module
    from alibi_surgery.diagnosis.stream import diagnose_streamed
    from alibi_surgery.io.loading import load_model, load_tokenizer

    _join(rank, world_size, store)
    out = Path(out)
    seen = {}
    try:
        net, tok = load_model(model, dtype="float32", device="cpu")
        seen["memory"] = diagnose_module.diagnose(net, tok, prompts, batch_size=2, backend="torch").to_dict()
        seen["streamed"] = diagnose_streamed(model, load_tokenizer(model), prompts, batch_size=2,
                                             backend="torch").to_dict()
        prompts_file = out / "prompts.txt"
        if rank == 0:
            prompts_file.write_text("\n".join(prompts) + "\n")
        dist.barrier()
        cli = ["diagnose", model, "--prompts-file", str(prompts_file), "--batch-size", "2", "--backend", "torch",
               "--device", "cpu", "--quiet"]
        seen["cli"] = _main(main, [*cli, "--json", str(out / "cli.json")])
        real = diagnose_module.padded_batches

        def failing(*args, **kwargs):
            if rank == 1:
                raise RuntimeError("boom on purpose")
            yield from real(*args, **kwargs)

        seen["refused"] = _main(main, ["repair", model, "--out", str(out / f"repair{rank}"), "--corpus",
                                       str(prompts_file)])
        diagnose_module.padded_batches = failing
        try:
            seen["failed"] = _main(main, [*cli, "--json", str(out / "never.json")])
        finally:
            diagnose_module.padded_batches = real
    finally:
        (out / f"rank{rank}.json").write_text(json.dumps(seen))
        dist.destroy_process_group()


def _main(main, argv: list) -> dict:
    """``main(argv)`` with its output captured: exit status, stdout and stderr."""
    import sys

    stdout, stderr = io.StringIO(), io.StringIO()
    saved = sys.stdout
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(argv)
    finally:
        sys.stdout = saved  # a non-zero rank's main points stdout at /dev/null
    return {"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


FSDP_SELECTION = {0: [1], 1: [0, 3]}  # three heads in both layers of the 2-layer tiny shapes
FSDP_OPTIM = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def fsdp_batch(vocab: int, batch: int = 4, seq: int = 16):
    """The training batch of the FSDP tests: ``batch`` sequences of ``seq`` random token ids (seeded)."""
    import torch

    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(7))


def _fsdp_setup(rank: int, world_size: int, model: str):
    """The model of ``model`` with :data:`FSDP_SELECTION` as head parameters, every block and the loss root sharded
    on a CPU mesh, AdamW on the heads, and this rank's share of :func:`fsdp_batch`:
    ``(net, tokenizer, heads, root, optimizer, ids)``."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    from alibi_surgery.attention.patch import patch
    from alibi_surgery.io.loading import load_model
    from alibi_surgery.surgery.sharded import HeadParams, LanguageModelLoss, shard

    net, tok = load_model(model, dtype="float32", device="cpu")
    patch(net.eval(), "torch")
    heads = HeadParams(net, FSDP_SELECTION)
    root = shard(LanguageModelLoss(net), init_device_mesh("cpu", (world_size,)))
    opt = torch.optim.AdamW(heads.params, **FSDP_OPTIM)
    return net, tok, heads, root, opt, fsdp_batch(net.config.vocab_size).chunk(world_size)[rank]


def fsdp_ranks(rank: int, world_size: int, store: str, model: str, steps: int, out: str) -> None:
    """``steps`` AdamW steps (clip 1.0) on :data:`FSDP_SELECTION` under FSDP2: every block ``fully_shard``-ed on a
    CPU mesh with the chunked loss as the root (:class:`LanguageModelLoss`), the rank's share of :func:`fsdp_batch`
    (equal rows each), torch attention backend. Rank 0 saves the
    losses (averaged over ranks), the first step's head-parameter gradients (gathered) and the gathered, folded
    final state to ``out/fsdp.pt``."""
    import torch
    import torch.distributed as dist

    _join(rank, world_size, store)
    try:
        net, _, heads, root, opt, ids = _fsdp_setup(rank, world_size, model)
        losses, grads = [], None
        for _ in range(steps):
            loss = root(ids)
            loss.backward()
            if grads is None:
                grads = [p.grad.full_tensor() for p in heads.params]
            torch.nn.utils.clip_grad_norm_(heads.params, 1.0)
            opt.step()
            opt.zero_grad()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / world_size)
        state = dict(heads.full_state(net))
        if rank == 0:
            torch.save({"losses": losses, "grads": grads, "state": state}, Path(out) / "fsdp.pt")
    finally:
        dist.destroy_process_group()


def fsdp_resume_ranks(rank: int, world_size: int, store: str, model: str, out: str, phase: str) -> None:
    """``phase="first"``: 2 AdamW steps under FSDP2 (as :func:`fsdp_ranks`), a checkpoint at ``out/ckpt``, then 1
    step more and ``out/final-straight`` (uninterrupted). ``phase="resume"``: load ``out/ckpt`` into this world
    size, 1 step, ``out/final-resumed``. Rank r trains on its share of :func:`fsdp_batch`."""
    import torch
    import torch.distributed as dist

    from alibi_surgery.surgery.sharded_io import load_sharded, save_sharded, write_final

    _join(rank, world_size, store)
    try:
        net, tok, heads, root, opt, ids = _fsdp_setup(rank, world_size, model)

        def step():
            root(ids).backward()
            torch.nn.utils.clip_grad_norm_(heads.params, 1.0)
            opt.step()
            opt.zero_grad()

        out = Path(out)
        if phase == "first":
            step()
            step()
            save_sharded(out / "ckpt", root, opt, {"step": 2})
            step()
            write_final(out / "final-straight", net, heads, tok)
        else:
            assert load_sharded(out / "ckpt", root, opt) == {"step": 2}
            step()
            write_final(out / "final-resumed", net, heads, tok, max_shard_bytes=200_000)  # several shards
    finally:
        dist.destroy_process_group()


def fsdp_failed_save_ranks(rank: int, world_size: int, store: str, model: str, out: str) -> None:
    """A checkpoint at ``out/ckpt-1``, then one at ``out/ckpt-2`` whose write fails on rank 1 (its storage writer
    raises): each rank records what it raised in ``out/failed{rank}.json``."""
    import torch.distributed as dist
    from torch.distributed.checkpoint import FileSystemWriter

    from alibi_surgery.surgery.sharded_io import save_sharded

    _join(rank, world_size, store)
    seen = {}
    try:
        net, tok, heads, root, opt, ids = _fsdp_setup(rank, world_size, model)
        root(ids).backward()
        opt.step()
        save_sharded(Path(out) / "ckpt-1", root, opt, {"step": 1})
        if rank == 1:
            def broken(self, *args, **kwargs):
                raise OSError("disk full on purpose")
            FileSystemWriter.write_data = broken
        try:
            save_sharded(Path(out) / "ckpt-2", root, opt, {"step": 2})
            seen["raised"] = None
        except Exception as exc:  # noqa: BLE001 - the test reads what each rank saw
            seen["raised"] = f"{type(exc).__name__}: {exc}"
    finally:
        (Path(out) / f"failed{rank}.json").write_text(json.dumps(seen))
        dist.destroy_process_group()


def repair_ranks(rank: int, world_size: int, store: str, argv: list, out: str) -> None:
    """``repair ... --distributed fsdp`` through the CLI (``argv``) as one rank; writes what it said to
    ``out/rank{rank}.json``."""
    import torch.distributed as dist

    from alibi_surgery.cli.main import main

    _join(rank, world_size, store)
    seen = {}
    try:
        seen = _main(main, argv)
    finally:
        Path(out, f"rank{rank}.json").write_text(json.dumps(seen))
        dist.destroy_process_group()
