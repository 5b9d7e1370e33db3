"""FSDP2 surgery's building blocks (issue 32, item 2): head slices as parameters of their own (HeadParams), every
block ``fully_shard``-ed over two CPU ranks (gloo), against one process training the same slices with HeadSlices
and HeadSlicedAdamW (the path ``repair`` takes) on the whole batch.

Bounds (fp32): the ranks average two half-batch means where one process takes the mean of the whole batch (equal
token counts: the same number up to summation order), and the output projection's split sum rounds once more, so the
loss and the head gradients agree to 1e-6 relative (measured: 3e-7 of the tensor's largest gradient). The updated
weights cannot be held to that: AdamW divides each element's gradient by its own running RMS, so a gradient error of
e relative to the tensor's largest gradient becomes an update error of about lr * e * max|g| / |g_i| for element i,
large where g_i is near 0 (measured after 3 steps at lr 3e-3: 2-5e-6 of the update's norm for the weights, 2e-4 for
BLOOM's QKV bias, whose gradients are small). The updates are held to 1e-3 of their norm and every element to 0.5%
of lr per step (a wrong row, sign or scaling moves elements by O(lr)); every other weight is bit-identical.
"""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

import dist_ranks
from alibi_surgery.analysis.loss import causal_lm_labels, chunked_lm_loss
from alibi_surgery.attention.patch import patch
from alibi_surgery.io.loading import load_model
from alibi_surgery.io.random_model import write_random_model
from alibi_surgery.surgery.optim import HeadSlicedAdamW
from alibi_surgery.surgery.sharded import HeadParams
from alibi_surgery.surgery.slices import HeadSlices

STEPS = 3


def _reference(model: str):
    """One process: HeadSlices + HeadSlicedAdamW (torch path), the whole batch; losses, first grads per kind and
    layer (concatenated as HeadParams orders them), final state."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net, _ = load_model(model, dtype="float32", device="cpu")
        patch(net.eval(), "torch")
        slices = HeadSlices(net, dist_ranks.FSDP_SELECTION)
        o = dist_ranks.FSDP_OPTIM
        opt = HeadSlicedAdamW(slices, lr=o["lr"], betas=o["betas"], eps=o["eps"], weight_decay=o["weight_decay"],
                              max_grad_norm=1.0, backend="torch")
        ids = dist_ranks.fsdp_batch(net.config.vocab_size)
        losses, grads = [], None
        for _ in range(STEPS):
            hidden = net.base_model(ids, use_cache=False).last_hidden_state  # the trainer's loss
            loss = chunked_lm_loss(hidden, net.get_output_embeddings().weight, causal_lm_labels(ids))
            loss.backward()
            if grads is None:
                grads = []
                for layer in slices.selection:
                    for kind, dim in (("qkv_weight", 0), ("qkv_bias", 0), ("dense_weight", 1)):
                        parts = [t.grad.clone() for s, t in zip(slices.specs, slices.tensors)
                                 if s.layer == layer and s.kind == kind]
                        if parts:
                            grads.append(torch.cat(parts, dim))
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        slices.remove()
        return losses, grads, net.state_dict()
    finally:
        torch.set_num_threads(threads)


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-6) -> bool:
    return float((a - b).abs().max()) <= rel * max(float(b.abs().max()), 1e-30)


@pytest.mark.parametrize("shape", ["tiny", "tiny-mpt"])
def test_fsdp_steps_on_two_ranks_equal_one_process(shape, tmp_path):
    model = str(write_random_model(tmp_path / "model", shape, n_layer=2, vocab_size=260, seed=0))
    mp.spawn(dist_ranks.fsdp_ranks, args=(2, str(tmp_path / "store"), model, STEPS, str(tmp_path)), nprocs=2,
             join=True)
    got = torch.load(tmp_path / "fsdp.pt")
    losses, grads, state = _reference(model)
    assert got["losses"] == pytest.approx(losses, rel=1e-6)
    assert len(got["grads"]) == len(grads)
    for g, r in zip(got["grads"], grads):
        assert g.shape == r.shape and _close(g, r), float((g - r).abs().max())
    stock, _ = load_model(model, dtype="float32", device="cpu")
    before = stock.state_dict()
    assert set(got["state"]) == set(state) == set(before)
    changed = 0
    for key, value in state.items():
        if torch.equal(value, before[key]):
            assert torch.equal(got["state"][key], before[key]), key  # frozen: bit-identical
        else:
            changed += 1
            want, have = value - before[key], got["state"][key] - before[key]
            assert float((have - want).abs().max()) <= 5e-3 * dist_ranks.FSDP_OPTIM["lr"] * STEPS, key
            assert float((have - want).norm()) <= 1e-3 * float(want.norm()), key
    assert changed == 2 * 2 + (2 if shape == "tiny" else 0)  # qkv and output weights of both layers, BLOOM's bias


def test_head_params_fold_into_the_weights_and_leave_the_model_stock(tiny_lm):
    """Without sharding: the routed forward equals the model's own, fold writes the values and restores it."""
    ids = torch.randint(0, tiny_lm.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = tiny_lm(ids).logits
    names = {k for k, _ in tiny_lm.named_parameters()}
    heads = HeadParams(tiny_lm, {1: [2]})
    assert all(not p.requires_grad for k, p in tiny_lm.named_parameters() if k in names)
    assert [p.requires_grad for p in heads.params] == [True] * len(heads.params)
    with torch.no_grad():
        torch.testing.assert_close(tiny_lm(ids).logits, want, rtol=1e-6, atol=1e-6)
        for p in heads.params:
            p.add_(0.5)
        moved = tiny_lm(ids).logits
    heads.fold()
    assert {k for k, _ in tiny_lm.named_parameters()} == names
    with torch.no_grad():
        torch.testing.assert_close(tiny_lm(ids).logits, moved, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(moved, want, atol=1e-3)


def test_checkpoint_resumes_on_another_world_size_and_final_loads_in_stock_transformers(tmp_path):
    """2 ranks: 2 steps, a DCP checkpoint, 1 step, ``final-straight``; 1 rank: the checkpoint, 1 step,
    ``final-resumed`` (several safetensors shards). Both load in stock transformers and agree within the update
    bound above; the frozen weights are the input's, bit for bit; the checkpoint holds the head slices only."""
    from transformers import AutoModelForCausalLM

    model = str(write_random_model(tmp_path / "model", "tiny", n_layer=2, vocab_size=260, seed=0))
    mp.spawn(dist_ranks.fsdp_resume_ranks, args=(2, str(tmp_path / "store2"), model, str(tmp_path), "first"),
             nprocs=2, join=True)
    mp.spawn(dist_ranks.fsdp_resume_ranks, args=(1, str(tmp_path / "store1"), model, str(tmp_path), "resume"),
             nprocs=1, join=True)
    assert not list(tmp_path.glob(".tmp-*"))
    ckpt = sum(f.stat().st_size for f in (tmp_path / "ckpt").iterdir() if f.suffix == ".distcp")
    stock = AutoModelForCausalLM.from_pretrained(model)
    d, h = 32, 128
    slices = 3 * (3 * d * h + 3 * d + h * d)  # three heads' qkv rows, their bias, output columns
    assert 3 * slices * 4 <= ckpt < 3 * slices * 4 * 1.25, ckpt  # values and two moments (fp32, DCP framing)
    assert len(list((tmp_path / "final-resumed").glob("model-*-of-*.safetensors"))) > 1
    before = stock.state_dict()
    straight = AutoModelForCausalLM.from_pretrained(tmp_path / "final-straight").state_dict()
    resumed = AutoModelForCausalLM.from_pretrained(tmp_path / "final-resumed").state_dict()
    assert set(straight) == set(resumed) == set(before)
    changed = 0
    for key, value in before.items():
        if torch.equal(straight[key], value):
            assert torch.equal(resumed[key], value), key
            continue
        changed += 1
        want, have = straight[key] - value, resumed[key] - value
        assert float((have - want).abs().max()) <= 5e-3 * dist_ranks.FSDP_OPTIM["lr"] * STEPS, key
        assert float((have - want).norm()) <= 1e-3 * float(want.norm()), key
    assert changed == 6  # both layers' qkv weight and bias, output weight


def test_a_rank_that_fails_its_write_fails_the_checkpoint_on_every_rank_and_leaves_none(tmp_path):
    """Rank 1's storage writer raises while checkpoint 2 is written: both ranks raise (naming the failure), there is
    no ``ckpt-2`` and no partial ``.tmp-ckpt-2``, and ``ckpt-1`` is whole (its marker and DCP's metadata)."""
    import json

    model = str(write_random_model(tmp_path / "model", "tiny", n_layer=2, vocab_size=260, seed=0))
    mp.spawn(dist_ranks.fsdp_failed_save_ranks, args=(2, str(tmp_path / "store"), model, str(tmp_path)), nprocs=2,
             join=True)
    seen = [json.loads((tmp_path / f"failed{r}.json").read_text()) for r in range(2)]
    for s in seen:  # one WriteError line on each rank, naming the checkpoint, the rank and the reason
        assert s["raised"].startswith("WriteError: writing checkpoint ") and "ckpt-2 failed on rank 1: OSError: disk " \
            "full on purpose" in s["raised"], seen
    assert not (tmp_path / "ckpt-2").exists() and not list(tmp_path.glob(".tmp-*"))
    assert json.loads((tmp_path / "ckpt-1" / "trainer_state.json").read_text()) == {"step": 1}
    assert (tmp_path / "ckpt-1" / ".metadata").is_file()
