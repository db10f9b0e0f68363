"""Pictures for people: heatmap overlays and ROC / PR curves, written as PNG files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import numpy as np  # noqa: E402
from matplotlib import colormaps  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

PANEL_SIZE = 256


def heatmap_rgb(anomaly_map: np.ndarray, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Colour an `[H, W]` map with the jet colormap -> `[H, W, 3]` uint8.

    Args:
        value_range: `(low, high)` mapped to the colormap ends; defaults to the map's own min and max.
    """
    low, high = value_range if value_range is not None else (float(anomaly_map.min()), float(anomaly_map.max()))
    scaled = np.clip((anomaly_map - low) / (high - low), 0.0, 1.0) if high > low else np.zeros_like(anomaly_map)
    return (colormaps["jet"](scaled)[..., :3] * 255).astype(np.uint8)


def overlay(image: Image.Image, anomaly_map: np.ndarray, alpha: float = 0.5, value_range=None) -> Image.Image:
    """Blend the heatmap of `anomaly_map` over `image` (resized to the map's size)."""
    base = image.convert("RGB").resize((anomaly_map.shape[1], anomaly_map.shape[0]), Image.Resampling.BILINEAR)
    heat = Image.fromarray(heatmap_rgb(anomaly_map, value_range))
    return Image.blend(base, heat, alpha)


def comparison_panel(
    image: Image.Image, anomaly_map: np.ndarray, gt_mask: np.ndarray | None = None, value_range=None
) -> Image.Image:
    """Side by side: image | ground truth (when given) | overlay of the map, each `PANEL_SIZE` square."""
    panels = [image.convert("RGB")]
    if gt_mask is not None:
        panels.append(Image.fromarray((np.asarray(gt_mask) > 0).astype(np.uint8) * 255).convert("RGB"))
    panels.append(overlay(image, anomaly_map, value_range=value_range))
    canvas = Image.new("RGB", (PANEL_SIZE * len(panels), PANEL_SIZE))
    for index, panel in enumerate(panels):
        canvas.paste(panel.resize((PANEL_SIZE, PANEL_SIZE), Image.Resampling.BILINEAR), (index * PANEL_SIZE, 0))
    return canvas


def plot_curves(
    curves: Sequence[tuple[str, np.ndarray, np.ndarray]], path: str | Path, kind: str = "roc", title: str = ""
) -> Path:
    """Write ROC (`kind="roc"`) or precision-recall (`kind="pr"`) curves, one per `(name, scores, labels)`."""
    figure, axes = plt.subplots(figsize=(5, 5), dpi=100)
    for name, scores, labels in curves:
        labels = np.asarray(labels).astype(int).ravel()
        if labels.min() == labels.max():
            continue  # undefined for a single class
        if kind == "roc":
            x_values, y_values, _ = roc_curve(labels, np.asarray(scores).ravel())
        else:
            y_values, x_values, _ = precision_recall_curve(labels, np.asarray(scores).ravel())
        axes.plot(x_values, y_values, label=name)
    x_label, y_label = ("false positive rate", "true positive rate") if kind == "roc" else ("recall", "precision")
    axes.set(xlabel=x_label, ylabel=y_label, xlim=(0, 1), ylim=(0, 1.02), title=title or kind.upper())
    if axes.lines:
        axes.legend(loc="lower right" if kind == "roc" else "lower left", fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


__all__ = ["comparison_panel", "heatmap_rgb", "overlay", "plot_curves"]
