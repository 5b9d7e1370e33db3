"""Head ablation: how much held-out loss rises when one head's output is removed, against a noise floor.

``ablate_heads(model, texts, heads)`` measures, for each ``(layer, head)`` of a causal LM of a registered family
(BLOOM, MPT, Falcon-RW), on held-out texts each scored alone (no padding; the mean next-token NLL over every text's
predicted tokens, token-weighted, in nats):

* ``output_norm``: the mean over every token of ``||W_o[:, cols(h)] z_t||``, the head's write to the residual stream
  (``z_t`` the head's slice of the output projection's input, ``cols(h) = [h d, (h+1) d)``; as diagnosis defines it);
* the **effect** of each mode: the loss with the head's slice of the projection's input replaced, minus the loss
  without: ``zero`` sets ``z_t := 0``, ``mean`` sets ``z_t := m``, its mean over the scored tokens (every position
  that predicts a token) of all texts, measured first;
* the **noise floor** of each mode: the same increase when, instead of the head's removed component
  ``d_t = W_h (z_t - m)`` (``m = 0`` for zero-ablation), ``Q d_t`` is removed, ``Q`` a random rotation of the residual
  space (``R`` draws, seeded per ``(seed, layer, head)``), and the floor is the 95th percentile of the ``R``
  increases. ``Q d_t`` has each token's norm ``||d_t||`` (and the tokens' inner products: the same write, pointed in
  a random direction). Built as ``U_r R_h (z_t - m)`` with ``W_h = V_h R_h`` (a thin QR) and ``U_r`` a Haar-random
  ``hidden x d`` orthonormal frame: equal in law to a Haar rotation applied to ``d_t``, at ``O(hidden d)`` memory;
* a paired bootstrap 95% interval over texts of each effect (per-text NLL differences, resampled with the texts'
  token counts; :func:`~alibi_surgery.analysis.intervals.paired_bootstrap_ci`, ``bootstrap`` resamples, 0 skips).

The rules (does work, revived) and the records are in :mod:`alibi_surgery.analysis.ablation_report`.

How, and the cost: each text runs once through every block (block by block, the hidden states of all texts at one
layer kept), with a forward pre-hook on the layer's output projection that records its input. For each target head
of that layer, each text's hidden state entering the layer is repeated once per variant (the unablated row, one per
mode, one per mode and floor draw: ``1 + modes x (1 + R)`` rows, in passes of at most ``rows_per_pass`` rows, each
pass with its own unablated row) and run through the blocks above, the final norm and the LM head. A forward
pre-hook edits only that head's input slice of each ablated row; a forward hook subtracts each floor row's random
write from the projection's output. No T x T matrix, no ``[tokens, vocab]`` logits (the loss is
:func:`~alibi_surgery.analysis.loss.chunked_lm_loss`, one row at a time). Cost: one forward of the model per text,
plus, per target head in layer ``l`` and text, ``1 + modes x (1 + R)`` rows (+1 per extra pass) through the
``n_layer - l`` blocks from ``l`` on; memory: the hidden states and projection inputs of all texts at one layer, one
pass of rows, and ``R x hidden x head_dim`` floats of random frames per head.

Limits: the blocks run one at a time on the fused attention (``backend`` ``auto``, ``torch`` or ``triton``; not
``eager``), eval mode, no gradients; a model whose output projection is not called as a module (BLOOM with
``pretraining_tp > 1`` and ``slow_but_exact``) is refused. In bfloat16/float16 the edits are made in the model's dtype
(the mean and the random writes are computed in float32, then rounded) and the loss is computed in float32; the
effects then carry the low precision's rounding noise, which the floor partly absorbs. A head whose output columns are
all zero writes nothing: its effects, floors and intervals are exactly 0 (not measured).
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import UsageError
from .ablation_report import FLOOR_QUANTILE, MODES, Ablation, HeadAblation, ModeEffect

__all__ = ["ablate_heads", "check_mode", "head_pairs", "DEFAULT_FLOOR_DRAWS", "DEFAULT_BOOTSTRAP"]

DEFAULT_FLOOR_DRAWS = 20
DEFAULT_BOOTSTRAP = 1000


class _Stop(Exception):
    """Raised by the hook that captures the hidden states entering block 0, to stop the forward there."""


def check_mode(mode: str) -> tuple[str, ...]:
    """``"zero"``, ``"mean"`` or ``"both"`` -> the modes measured."""
    if mode == "both":
        return MODES
    if mode in MODES:
        return (mode,)
    raise UsageError(f"mode={mode!r}: choose zero, mean or both")


def _whole(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UsageError(f"{name}={value!r}: must be a whole number >= {low}")
    return value


def head_pairs(heads, n_layer: int, n_head: int) -> list[tuple[int, int]]:
    """``heads`` (a spec string such as ``"2:12-15;3:*"``, a ``{layer: [heads]}`` selection or ``(layer, head)``
    pairs) -> sorted distinct pairs, validated against the model's shape."""
    from ..diagnosis.selection import check_selection, parse_heads

    try:
        if isinstance(heads, str):
            selection = parse_heads(heads, n_layer, n_head)
        elif isinstance(heads, dict):
            selection = heads
        else:
            items = list(heads)
            selection = {}
            for item in items:
                if not (isinstance(item, (tuple, list)) and len(item) == 2):
                    raise UsageError(f"{item!r} is not a (layer, head) pair")
                selection.setdefault(item[0], []).append(item[1])
        selection = check_selection(selection, n_layer, n_head)
    except (UsageError, TypeError) as exc:
        raise UsageError(f"heads={heads!r}: {exc}") from None
    return [(layer, h) for layer, hs in selection.items() for h in hs]


def _encoded(texts, tokenizer, max_length, name) -> list[list[int]]:
    if tokenizer is not None:
        from .perplexity import encode_texts

        return encode_texts(tokenizer, texts, max_length, name=name)
    texts = list(texts) if not isinstance(texts, str) else None
    if not texts:
        raise UsageError("texts=...: give a non-empty list of token-id lists (or strings and a tokenizer)")
    for i, ids in enumerate(texts):
        if not (isinstance(ids, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
            raise UsageError(f"texts=...: text {i} is not a list of token ids (pass tokenizer= for strings)")
        if len(ids) < 2:
            raise UsageError(f"texts=...: text {i} has {len(ids)} token: it predicts nothing")
    return [list(ids) for ids in texts]


def ablate_heads(model, texts, heads, *, tokenizer=None, max_length: int | None = None, mode: str = "both",
                 floor_draws: int = DEFAULT_FLOOR_DRAWS, seed: int = 0, bootstrap: int = DEFAULT_BOOTSTRAP,
                 backend: str = "auto", rows_per_pass: int = 64, progress: bool = False, name=None) -> Ablation:
    """Measure every head of ``heads`` (see :func:`head_pairs`) of ``model`` (an in-memory causal LM) on ``texts``
    (strings with ``tokenizer``, truncated to ``max_length`` tokens; or token-id lists without), as the module
    docstring says. Returns an :class:`~alibi_surgery.analysis.ablation_report.Ablation` with one record per head,
    in (layer, head) order. The model is left as it was (patch state, mode)."""
    from ..attention.backends import check_backend
    from ..attention.patch import attention_modules
    from .perplexity import _scoring

    modes = check_mode(mode)
    _whole("floor_draws", floor_draws, 1)
    _whole("seed", seed, 0)
    _whole("bootstrap", bootstrap, 0)
    _whole("rows_per_pass", rows_per_pass, 2)
    check_backend(backend)
    if backend == "eager":
        raise UsageError("backend='eager': ablation runs the blocks one at a time and needs a fused backend "
                         "(auto, torch or triton)")
    family, attns = attention_modules(model)
    if family.interface:
        raise UsageError(f"ablation covers the ALiBi families only, not {family.name}")
    layout = family.layout(model.config)
    targets = head_pairs(heads, layout.n_layer, layout.n_head)
    encoded = _encoded(texts, tokenizer, max_length, name)
    run = _Run(model, family, attns, layout, modes, floor_draws, seed, bootstrap, rows_per_pass)
    with _scoring(model, backend) as (base, device):
        records, base_loss = run.measure(base, device, encoded, targets, progress)
    scored = sum(len(ids) - 1 for ids in encoded)
    name_ = str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
    return Ablation(name_, modes, len(encoded), scored, base_loss, floor_draws, seed, bootstrap, records)


class _Run:
    """One measurement: the model's parts, the settings, and the walk over blocks."""

    def __init__(self, model, family, attns, layout, modes, draws, seed, bootstrap, rows_per_pass):
        self.model, self.family, self.attns, self.layout = model, family, attns, layout
        self.modes, self.draws, self.seed, self.bootstrap, self.rows = modes, draws, seed, bootstrap, rows_per_pass
        self.blocks = family.decoder_blocks(model)
        self.norm = family.final_norm_module(model)
        self.lm_weight = model.get_output_embeddings().weight.detach()
        self._inputs: dict = {}

    # --- the walk -------------------------------------------------------------------------------------------
    def measure(self, base, device, encoded, targets, progress):
        self.ids = [torch.tensor([e], dtype=torch.long, device=device) for e in encoded]
        self.n = np.array([len(e) - 1 for e in encoded], dtype=np.float64)  # scored tokens per text
        hidden = [self._first_hidden(base, row) for row in self.ids]
        by_layer: dict[int, list[int]] = {}
        for layer, head in targets:
            by_layer.setdefault(layer, []).append(head)
        records = []
        with tqdm(total=len(targets), desc="ablate", unit="head", disable=not progress) as bar:
            for layer, block in enumerate(self.blocks):
                if layer not in by_layer:
                    hidden = [self._block(block, h) for h in hidden]
                    continue
                proj = self.family.out(self.attns[layer])
                inputs, after = self._capture(block, proj, hidden, layer)
                for head in by_layer[layer]:
                    records.append(self._head(layer, head, proj, hidden, inputs))
                    bar.update()
                hidden = after
        nll = np.array([self._nll(h, ids)[0] for h, ids in zip(hidden, self.ids)])
        return records, float(nll.sum() / self.n.sum())

    def _first_hidden(self, base, ids):
        """The hidden states entering block 0 for one text (the forward stops there)."""
        found = {}

        def stop(module, args, kwargs):
            found["h"] = args[0] if args else kwargs["hidden_states"]
            raise _Stop

        hook = self.blocks[0].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            base(input_ids=ids, use_cache=False)
        except _Stop:
            pass
        finally:
            hook.remove()
        return found["h"]

    def _block_args(self, rows: int, length: int, device):
        key = (rows, length)
        if key not in self._inputs:
            mask = torch.ones(rows, length, dtype=torch.long, device=device)
            self._inputs = {key: self.family.block_inputs(mask, self.model.config, self.lm_weight.dtype)}
        return self._inputs[key]

    def _block(self, block, h):
        args, kwargs = self._block_args(h.shape[0], h.shape[1], h.device)
        out = block(h, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def _capture(self, block, proj, hidden, layer):
        """Run ``block`` on every text: (the projection's input ``[T, n_head d]`` per text, the block's outputs)."""
        seen = []
        hook = proj.register_forward_pre_hook(lambda m, args: seen.append(args[0][0].detach()))
        try:
            after = [self._block(block, h) for h in hidden]
        finally:
            hook.remove()
        if len(seen) != len(hidden):
            raise UsageError(f"the output projection of layer {layer} is not called as a module (BLOOM with "
                             f"pretraining_tp > 1 and slow_but_exact?): its heads cannot be ablated")
        return seen, after

    def _nll(self, h, ids) -> list[float]:
        """Per-row sums of next-token NLL (nats, float32 scoring) of hidden states ``h [rows, T, hidden]`` leaving
        the last block."""
        from .loss import chunked_lm_loss

        h = self.norm(h)
        rows, scored = h.shape[0], ids.shape[1] - 1
        losses = chunked_lm_loss(h, self.lm_weight, ids.expand(rows, -1), reduction="none")  # one call, every row
        return losses.double().view(rows, scored).sum(dim=1).tolist()

    # --- one head -------------------------------------------------------------------------------------------
    def _head(self, layer, head, proj, hidden, inputs) -> HeadAblation:
        a, b = self.family.out_cols(head, self.layout)
        weight = proj.weight[:, a:b].detach()
        z = [x[:, a:b].float() for x in inputs]
        w32 = weight.float()
        norm = sum(float(torch.linalg.vector_norm(zi @ w32.T, dim=-1).double().sum()) for zi in z)
        output_norm = norm / sum(zi.shape[0] for zi in z)
        if not bool(weight.any()):  # writes nothing: every removal is the identity
            exact = ModeEffect(0.0, 0.0, None if self.bootstrap == 0 else (0.0, 0.0), (0.0,) * self.draws)
            return HeadAblation(layer, head, output_norm, **{m: exact for m in self.modes})
        mean = sum(zi[:-1].double().sum(0) for zi in z) / float(self.n.sum())
        centre = {"zero": torch.zeros_like(mean), "mean": mean}
        frames = self._frames(weight, layer, head)  # [R, hidden, d]
        variants = [(m, None) for m in self.modes] + [(m, r) for m in self.modes for r in range(self.draws)]
        diffs = np.zeros((len(variants), len(hidden)))
        for i, h in enumerate(hidden):
            dev = {m: (z[i] - centre[m].float()) for m in self.modes}
            for start in range(0, len(variants), self.rows - 1):
                chunk = variants[start:start + self.rows - 1]
                nll = self._pass(layer, proj, (a, b), h, self.ids[i], chunk, centre, dev, frames)
                diffs[start:start + len(chunk), i] = [v - nll[0] for v in nll[1:]]
        effects = diffs.sum(1) / self.n.sum()
        out = {}
        for k, m in enumerate(self.modes):
            draws = effects[len(self.modes) + k * self.draws: len(self.modes) + (k + 1) * self.draws]
            out[m] = ModeEffect(float(effects[k]), float(np.quantile(draws, FLOOR_QUANTILE)),
                                self._interval(diffs[k]), tuple(float(d) for d in draws))
        return HeadAblation(layer, head, output_norm, **out)

    def _interval(self, diff):
        from .intervals import paired_bootstrap_ci

        return paired_bootstrap_ci([diff, self.n], lambda s: float(s[0].sum() / s[1].sum()),
                                   resamples=self.bootstrap, seed=self.seed)

    def _frames(self, weight, layer, head) -> torch.Tensor:
        """``U_r R_h`` for each draw r: the head's write matrix ``W_h = V_h R_h`` with its column space ``V_h``
        replaced by a Haar-random orthonormal frame ``U_r`` (seeded by ``(seed, layer, head)``), float32."""
        state = np.random.SeedSequence([self.seed, layer, head]).generate_state(1, np.uint64)[0]
        gen = torch.Generator().manual_seed(int(state))
        hidden, d = weight.shape
        gauss = torch.randn(self.draws, hidden, d, generator=gen, dtype=torch.float64)
        q, r = torch.linalg.qr(gauss)
        q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)  # Haar: fix the QR's signs
        r_h = torch.linalg.qr(weight.detach().double().cpu())[1]
        return (q @ r_h).float().to(weight.device)

    def _pass(self, layer, proj, cols, h, ids, chunk, centre, dev, frames) -> list[float]:
        """Row 0 unablated, row k + 1 the k-th variant of ``chunk``: per-row NLL sums."""
        a, b = cols
        rows = 1 + len(chunk)
        dtype = h.dtype

        def edit_input(module, args):
            x = args[0].clone()
            for k, (m, draw) in enumerate(chunk, 1):
                if draw is None:
                    x[k, :, a:b] = centre[m].to(dtype)
            return (x, *args[1:])

        def remove_random(module, args, out):
            out = out.clone()
            for k, (m, draw) in enumerate(chunk, 1):
                if draw is not None:
                    out[k] -= (dev[m] @ frames[draw].T).to(dtype)
            return out

        hooks = [proj.register_forward_pre_hook(edit_input), proj.register_forward_hook(remove_random)]
        try:
            x = h.expand(rows, -1, -1).contiguous()
            for block in self.blocks[layer:]:
                x = self._block(block, x)
        finally:
            for hook in hooks:
                hook.remove()
        return self._nll(x, ids)
