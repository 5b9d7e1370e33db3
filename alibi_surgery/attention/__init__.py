"""The fused attention inside a model: backend choice (``backends``) and the reversible patching of a family's
attention modules (``patch``), over the adapter in :mod:`alibi_surgery.families`."""
