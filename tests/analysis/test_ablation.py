"""Head ablation against references written here: the zero-ablation effect against the model's own forward and labels
on a copy whose head columns are zeroed; the mean-ablation effect against a copy whose output projection has those
columns zeroed and ``W_h m`` added to its bias (``m`` measured here with a hook on the unpatched model); the base loss
and the output norm against direct float64 computations; a head with zero output columns gives exactly 0; the floor
is reproducible for a seed; the rules; the CLI (JSON written atomically, a table, one-line errors)."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from alibi_surgery.analysis.ablation import ablate_heads
from alibi_surgery.analysis.ablation_report import HeadAblation, ModeEffect, does_work, recovery, revived
from alibi_surgery.cli import main
from alibi_surgery.errors import UsageError
from alibi_surgery.io.loading import load_model
from alibi_surgery.io.random_model import write_random_model

# byte-level tokenizer: one token per UTF-8 byte
TEXTS = ["The keeper lit the lamp.", "x = [i * i for i in range(9)]", "Mein Luftkissenfahrzeug ist voller Aale",
         "ok, fine"]
# the output projection of layer l, written from each family's transformers code (not the adapter)
PROJ = {"tiny": lambda m, l: m.transformer.h[l].self_attention.dense,
        "tiny-mpt": lambda m, l: m.transformer.blocks[l].attn.out_proj,
        "tiny-falcon": lambda m, l: m.transformer.h[l].self_attention.dense}
REFERENCE_ATTN = {"tiny": "eager", "tiny-mpt": "eager", "tiny-falcon": "sdpa"}
HEAD_DIM = 32  # the tiny shapes: hidden 128, 4 heads


_BUILT: dict = {}


def _build(shape, tmp_path_factory):
    """(shape, model under test, fp32 reference with the family's ground-truth attention, token ids per text), built
    once per module and shape."""
    if shape not in _BUILT:
        path = write_random_model(tmp_path_factory.mktemp("abl") / shape, shape, n_layer=2, seed=3)
        net, tok = load_model(str(path), device="cpu")
        ref = type(net).from_pretrained(path, dtype=torch.float32, attn_implementation=REFERENCE_ATTN[shape]).eval()
        with torch.no_grad():  # louder output projections: effects well above fp32 rounding
            for layer in range(2):
                for m in (PROJ[shape](net, layer), PROJ[shape](ref, layer)):
                    m.weight.mul_(20.0)
        _BUILT[shape] = (shape, net, ref, [tok(t)["input_ids"] for t in TEXTS])
    return _BUILT[shape]


@pytest.fixture(scope="module", params=list(PROJ))
def case(request, tmp_path_factory):
    """Every family."""
    yield _build(request.param, tmp_path_factory)
    _BUILT.pop(request.param, None)


@pytest.fixture(scope="module")
def bloom(tmp_path_factory):
    """BLOOM only, for what does not depend on the family."""
    return _build("tiny", tmp_path_factory)


def _loss(net, encoded) -> tuple[float, list[float]]:
    """Token-weighted mean NLL over the texts (each alone) from the model's own forward and labels, and each text's
    NLL sum, in float64 arithmetic over transformers' per-text losses."""
    sums = []
    with torch.no_grad():
        for ids in encoded:
            x = torch.tensor([ids])
            sums.append(float(net(x, labels=x).loss) * (len(ids) - 1))
    return sum(sums) / sum(len(ids) - 1 for ids in encoded), sums


def _inputs(net, proj, encoded) -> list[torch.Tensor]:
    """The output projection's input ``[T, hidden]`` for each text, by a forward hook on the unpatched model."""
    seen = []
    hook = proj.register_forward_hook(lambda m, args, out: seen.append(args[0][0].double()))
    try:
        with torch.no_grad():
            for ids in encoded:
                net(torch.tensor([ids]))
    finally:
        hook.remove()
    return seen


def _with_projection(net, shape, layer, head, bias_shift=None):
    """A deep copy whose layer-``layer`` projection has ``head``'s columns zeroed and, optionally, ``bias_shift`` added
    to its bias (a new Linear with a bias, so MPT's bias-free projection takes it too)."""
    c = copy.deepcopy(net)
    old = PROJ[shape](c, layer)
    new = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        new.weight.copy_(old.weight)
        new.weight[:, head * HEAD_DIM:(head + 1) * HEAD_DIM] = 0
        new.bias.copy_(old.bias if old.bias is not None else torch.zeros(old.out_features))
        if bias_shift is not None:
            new.bias.add_(bias_shift.float())
    parent = c.get_submodule(_parent_path(c, old))
    setattr(parent, [n for n, m in parent.named_children() if m is old][0], new)
    return c


def _parent_path(model, module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name.rsplit(".", 1)[0]
    raise AssertionError("module not found")


HEADS = [(0, 1), (1, 3)]


def test_effects_equal_the_references(case):
    shape, net, ref, encoded = case
    got = ablate_heads(net, encoded, HEADS, floor_draws=3, bootstrap=0, backend="torch")
    base, _ = _loss(ref, encoded)
    assert got.base_loss == pytest.approx(base, rel=1e-5)
    assert got.tokens == sum(len(ids) - 1 for ids in encoded) and got.texts == len(TEXTS)
    for layer, head in HEADS:
        record = got.head(layer, head)
        z = _inputs(ref, PROJ[shape](ref, layer), encoded)
        w = PROJ[shape](ref, layer).weight.detach().double()[:, head * HEAD_DIM:(head + 1) * HEAD_DIM]
        zh = [x[:, head * HEAD_DIM:(head + 1) * HEAD_DIM] for x in z]
        norms = torch.cat([(x @ w.T).norm(dim=-1) for x in zh])
        assert record.output_norm == pytest.approx(float(norms.mean()), rel=1e-4)
        zero = _loss(_with_projection(ref, shape, layer, head), encoded)[0] - base
        scored = torch.cat([x[:-1] for x in zh])  # positions that predict a token
        mean = _loss(_with_projection(ref, shape, layer, head, w @ scored.mean(0)), encoded)[0] - base
        assert abs(zero) > 1e-3 and abs(mean) > 5e-5 and abs(zero - mean) > 1e-4  # two different, visible numbers
        assert record.zero.effect == pytest.approx(zero, rel=2e-3, abs=2e-6)
        assert record.mean.effect == pytest.approx(mean, rel=2e-3, abs=2e-6)
        for e in (record.zero, record.mean):
            assert len(e.draws) == 3 and e.floor == pytest.approx(float(np.quantile(e.draws, 0.95)))
            assert e.interval is None
        assert record.does_work == (record.mean.effect > record.mean.floor)


def test_interval_is_the_paired_bootstrap_of_the_per_text_differences(bloom):
    shape, net, ref, encoded = bloom
    got = ablate_heads(net, encoded, [(1, 2)], mode="zero", floor_draws=2, bootstrap=400, seed=5, backend="torch")
    _, base = _loss(ref, encoded)
    _, ablated = _loss(_with_projection(ref, shape, 1, 2), encoded)
    diff = np.subtract(ablated, base)
    n = np.array([len(ids) - 1 for ids in encoded], dtype=float)
    rng = np.random.default_rng(5)  # the percentile bootstrap, by hand
    stats = [diff[i].sum() / n[i].sum() for i in (rng.integers(0, len(n), len(n)) for _ in range(400))]
    low, high = np.quantile(stats, [0.025, 0.975])
    record = got.head(1, 2)
    assert record.mean is None and record.does_work is None
    assert record.zero.interval[0] == pytest.approx(low, rel=5e-3, abs=2e-6)
    assert record.zero.interval[1] == pytest.approx(high, rel=5e-3, abs=2e-6)


def test_zeroed_output_columns_give_exactly_zero(case):
    from alibi_surgery.surgery.reinit import reinit_heads

    shape, net, _, encoded = case
    c = copy.deepcopy(net)
    reinit_heads(c, {1: [0]}, seed=2)  # surgery's re-initialisation: fresh Q/K/V rows, zeroed output columns
    assert not PROJ[shape](c, 1).weight[:, :HEAD_DIM].any()
    got = ablate_heads(c, encoded, [(1, 0)], floor_draws=4, bootstrap=50, backend="torch")
    record = got.head(1, 0)
    assert record.output_norm == 0.0
    for e in (record.zero, record.mean):
        assert (e.effect, e.floor, e.interval, e.draws) == (0.0, 0.0, (0.0, 0.0), (0.0,) * 4)
    assert record.does_work is False


def test_floor_is_reproducible_for_a_seed_and_moves_with_it(bloom):
    _, net, _, encoded = bloom
    encoded = encoded[:2]
    runs = [ablate_heads(net, encoded, {0: [2]}, mode="mean", floor_draws=3, bootstrap=0, seed=s, backend="torch")
            for s in (7, 7, 8)]
    a, b, c = (r.head(0, 2).mean for r in runs)
    assert a.draws == b.draws and a.floor == b.floor
    assert a.draws != c.draws
    assert a.effect == pytest.approx(c.effect, abs=1e-7)  # the ablation itself does not depend on the seed
    # the draws do not depend on which other heads are measured with it
    both = ablate_heads(net, encoded, {0: [1, 2]}, mode="mean", floor_draws=3, bootstrap=0, seed=7, backend="torch")
    assert both.head(0, 2).mean.draws == pytest.approx(a.draws, abs=1e-7)


def test_bfloat16_runs_in_its_dtype_and_stays_near_float32(bloom):
    _, net, _, encoded = bloom
    low = copy.deepcopy(net).to(torch.bfloat16)
    got = ablate_heads(low, encoded, [(0, 1)], mode="zero", floor_draws=2, bootstrap=0, backend="torch")
    full = ablate_heads(net, encoded, [(0, 1)], mode="zero", floor_draws=2, bootstrap=0, backend="torch")
    assert low.transformer.h[0].self_attention.dense.weight.dtype == torch.bfloat16
    assert math.isfinite(got.head(0, 1).zero.effect)
    assert got.base_loss == pytest.approx(full.base_loss, rel=2e-2)
    assert got.head(0, 1).zero.effect == pytest.approx(full.head(0, 1).zero.effect, abs=0.05)


@pytest.mark.parametrize("kwargs, words", [
    (dict(heads="9:0"), "heads='9:0'"), (dict(heads="0:x"), "heads='0:x'"), (dict(heads=[(0, 7)]), "heads="),
    (dict(heads=[(0,)]), "heads="), (dict(mode="half"), "mode='half'"), (dict(floor_draws=0), "floor_draws=0"),
    (dict(bootstrap=-1), "bootstrap=-1"), (dict(seed=-2), "seed=-2"), (dict(backend="eager"), "backend='eager'"),
    (dict(texts=[]), "texts="), (dict(texts=[[5]]), "texts="), (dict(texts=["a b"]), "texts="),
])
def test_bad_input_is_one_line(bloom, kwargs, words):
    _, net, _, encoded = bloom
    args = dict(texts=encoded, heads=[(0, 1)])
    args.update(kwargs)
    with pytest.raises(UsageError) as err:
        ablate_heads(net, args.pop("texts"), args.pop("heads"), **args)
    assert words in str(err.value) and "\n" not in str(err.value)


def _effect(effect, floor, interval=None):
    return ModeEffect(effect, floor, interval)


def test_the_rules():
    # does work: the interval's lower bound (the point estimate without one) strictly above the floor
    assert does_work(_effect(0.3, 0.1, (0.11, 0.5))) is True
    assert does_work(_effect(0.3, 0.1, (0.09, 0.5))) is False
    assert does_work(_effect(0.3, 0.1)) is True and does_work(_effect(0.1, 0.1)) is False
    assert does_work(None) is None
    working = HeadAblation(0, 0, 1.0, mean=_effect(0.3, 0.1, (0.2, 0.4)))
    idle = HeadAblation(0, 1, 1.0, mean=_effect(0.0, 0.1, (-0.1, 0.1)))
    # revived: first-token mass not above 0.5 (not dead, not bos-sink) and does work
    assert revived(working, 0.49) and not revived(working, 0.51) and not revived(idle, 0.1)


def test_recovery_counts_over_targets():
    from alibi_surgery.analysis.ablation_report import Ablation

    class Report:  # the one field recovery reads
        def __init__(self, grid):
            self.bos_mass = torch.tensor(grid)

    before = Report([[0.9, 0.7, 0.2, 0.99]])
    after = Report([[0.1, 0.3, 0.1, 0.8]])
    yes, no = _effect(0.3, 0.1, (0.2, 0.4)), _effect(0.0, 0.1, (-0.1, 0.1))
    heads = [HeadAblation(0, 0, 1.0, mean=yes), HeadAblation(0, 1, 1.0, mean=no), HeadAblation(0, 2, 1.0, mean=yes),
             HeadAblation(0, 3, 1.0, mean=yes)]
    got = recovery(before, after, Ablation("m", ("zero", "mean"), 1, 10, 1.0, 20, 0, 0, heads))
    # collapsed before: H0, H1, H3; not after: H0, H1; of those doing work: H0
    assert (got.targets, got.collapsed_before, got.not_collapsed, got.revived) == (4, 3, 2, 1)
    assert got.format() == "collapsed -> not collapsed 2/3, revived (does work) 1/3"


# ------------------------------------------------------------------------------------------------ the CLI

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_model(tmp_path_factory.mktemp("ablcli") / "tiny", "tiny", n_layer=2, seed=3)


def test_cli_writes_json_and_prints_a_table(model_dir, tmp_path, capsys):
    prompts = tmp_path / "held.txt"
    prompts.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "abl.json"
    argv = ["ablate", str(model_dir), "--heads", "0:1;1:3", "--prompts-file", str(prompts), "--json", str(out),
            "--floor-draws", "3", "--bootstrap", "20", "--seed", "4", "--quiet", "--backend", "torch"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert [(h["layer"], h["head"]) for h in data["heads"]] == [(0, 1), (1, 3)]
    assert data["texts"] == 4 and data["floor_draws"] == 3 and data["bootstrap"] == 20 and data["seed"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abl.json", "held.txt"]  # no temporary file left
    net, tok = load_model(str(model_dir), device="cpu")
    api = ablate_heads(net, TEXTS, "0:1;1:3", tokenizer=tok, floor_draws=3, bootstrap=20, seed=4, backend="torch")
    assert data["heads"] == json.loads(json.dumps(api.to_dict()))["heads"]
    assert "mean_effect" in printed and "L1" in printed and "H3" in printed and f"wrote {out}" in printed
    # an existing --json is refused without --overwrite, before any work
    assert main(argv) == 2
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize("extra, words", [
    (["--heads", "5:0"], "--heads"), (["--heads", "0:1", "--mode", "half"], "--mode half"),
    (["--heads", "0:1", "--floor-draws", "0"], "--floor-draws 0"),
    (["--heads", "0:1", "--bootstrap", "-3"], "--bootstrap -3"),
])
def test_cli_bad_input_is_one_line(model_dir, tmp_path, capsys, extra, words):
    prompts = tmp_path / "held.txt"
    prompts.write_text("\n".join(TEXTS) + "\n")
    assert main(["ablate", str(model_dir), "--prompts-file", str(prompts), *extra, "--json",
                 str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and words in err and "\n" not in err
    assert not (tmp_path / "o.json").exists()
