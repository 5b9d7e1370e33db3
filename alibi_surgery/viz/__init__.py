"""Figures: layer x head heatmaps, comparison and Δ panels, drift over training, the first-token mass histogram;
written atomically (``io.files.atomic_savefig``)."""
