"""Where each tensor of a safetensors checkpoint lives, and reading a few of them: :class:`CheckpointIndex`.

Used to stream a model one block at a time (:mod:`alibi_surgery.diagnosis.stream`) and to read weights without
building the model (:func:`alibi_surgery.diagnosis.dormancy.checkpoint_dormancy`). The checkpoint is verified
(:func:`~alibi_surgery.io.checkpoint.verify_checkpoint`) when the index is built; every tensor read is checked for
NaN/inf. Limits: safetensors only (one file or an index of shards).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UsageError
from .checkpoint import check_finite, verify_checkpoint
from .loading import load_config, resolve_model_dir

__all__ = ["CheckpointIndex"]


class CheckpointIndex:
    """Where each tensor of a safetensors checkpoint lives (names without the ``transformer.`` prefix)."""

    def __init__(self, model_dir: str | Path):
        from ..families import family_for

        self.dir = resolve_model_dir(str(model_dir))
        self.config = load_config(str(model_dir))
        self.family = family_for(self.config, str(model_dir))
        self.files = {name: (e.file, e.stored) for name, e in verify_checkpoint(self.dir, self.config).items()}

    def load(self, names: list[str], device, dtype) -> dict[str, torch.Tensor]:
        """The named tensors (stripped names), opening each shard once, converted to ``dtype`` on ``device``."""
        from safetensors import safe_open

        missing = [n for n in names if n not in self.files]
        if missing:
            raise UsageError(f"{self.dir}: tensor {missing[0]} is missing from the checkpoint")
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n][0], []).append(n)
        out = {}
        for file, group in by_file.items():
            with safe_open(file, "pt") as f:
                for n in group:
                    out[n] = f.get_tensor(self.files[n][1]).to(device=device, dtype=dtype)
        check_finite(out.items(), str(self.dir))
        return out

    def embedding_rows(self, name: str, ids: torch.Tensor, device, dtype) -> torch.Tensor:
        """``name[ids]`` (an embedding table) reading only the rows in ``ids`` (sorted unique), as
        ``[*ids.shape, H]``."""
        from safetensors import safe_open

        file, stored = self.files[name]
        unique, inverse = torch.unique(ids.cpu(), return_inverse=True)
        with safe_open(file, "pt") as f:
            table = f.get_slice(stored)
            n_rows = table.get_shape()[0]
            if int(unique[-1]) >= n_rows:
                raise UsageError(f"token id {int(unique[-1])} is outside the embedding table ({n_rows} rows)")
            rows = torch.cat([table[int(i):int(i) + 1] for i in unique])
        check_finite([(f"{name} (used rows)", rows)], str(self.dir))
        return rows.to(device=device, dtype=dtype)[inverse.to(device)]
