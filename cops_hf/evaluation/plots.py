"""Former home of the pictures; they live in :mod:`cops_hf.visualization` now (names kept importable here)."""

from ..visualization import comparison_panel, heatmap_rgb, overlay, plot_curves

__all__ = ["comparison_panel", "heatmap_rgb", "overlay", "plot_curves"]
