"""Figures: layer x head heatmaps and comparison panels, written atomically (``io.files.atomic_savefig``)."""
