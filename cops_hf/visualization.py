"""Pictures a person reads at a glance: overlays, colour bars, contours, titled panels and ROC / PR curves.

One module shared by `cops-hf predict`, `evaluate`, the demo and the Gradio app.

* Overlays keep the image's aspect ratio and carry a colour bar, a caption with the score and the decision, and
  the contour of the predicted mask when a pixel threshold is known (white) and of the ground truth (green).
* The colour scale is anchored to the calibrated pixel threshold (the threshold sits in the middle of the bar, so
  a colour means the same on every image) or, without one, spans the map's own range, which the caption prints.
* Curves carry AUROC / AP in their legends; pixel-level curves sit beside the image-level ones.

Rendering uses matplotlib's object API on the Agg canvas: no global pyplot state, safe in threads (the app).
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure
from PIL import Image

from .schema import ANOMALOUS, ANOMALY_MAP, NORMAL, PRED_LABEL, PRED_SCORE

DEFAULT_COLORMAP = "jet"
"""Colormap of the heatmaps (any matplotlib name: jet, turbo, inferno, viridis, ...)."""

DEFAULT_ALPHA = 0.5
"""Opacity of the heatmap over the image (0: image only, 1: heatmap only)."""

PREDICTED_CONTOUR_COLOUR = "white"
GROUND_TRUTH_CONTOUR_COLOUR = "#00e000"
DECISION_COLOURS = {ANOMALOUS: "#c62828", NORMAL: "#2e7d32"}

PANEL_LONG_SIDE = (320, 720)
"""Smallest and largest long side, in pixels, an image is drawn at (its aspect ratio is kept)."""

_DPI = 100
_COLOUR_BAR_WIDTH = 90
_TITLE_HEIGHT = 34
_PANEL_TITLE_HEIGHT = 26
_DECISION_HEIGHT = 30
_SMALL_LINE_HEIGHT = 13
_SMALL_CHARACTER_WIDTH = 6.0
_MARGIN = 10


def colormap(name: str = DEFAULT_COLORMAP) -> Colormap:
    """The matplotlib colormap `name`, with a clear error for an unknown one."""
    try:
        return colormaps[name]
    except KeyError:
        raise ValueError(
            f"unknown colormap {name!r}; use a matplotlib name such as jet, turbo, inferno, viridis"
        ) from None


def _check_alpha(alpha: float) -> float:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return float(alpha)


def check_style(colormap_name: str = DEFAULT_COLORMAP, alpha: float = DEFAULT_ALPHA) -> None:
    """Raise `ValueError` for an unknown colormap or an opacity outside [0, 1] (call it before long work)."""
    colormap(colormap_name)
    _check_alpha(alpha)


@dataclass(frozen=True)
class ColourScale:
    """The values mapped to the two ends of the colour bar, and what anchors them.

    Attributes:
        low, high: map values at the bottom and the top of the colour bar.
        threshold: the pixel threshold it is anchored to (in the middle), or `None` for a range of map values.
        span_of: what `low..high` is the range of, when not anchored to a threshold (for the caption).
    """

    low: float
    high: float
    threshold: float | None = None
    span_of: str = "this map's range"

    @classmethod
    def for_maps(
        cls,
        anomaly_maps: np.ndarray | Sequence[np.ndarray],
        pixel_threshold: float | None = None,
        span_of: str = "this map's range",
    ) -> ColourScale:
        """The colour scale of one map or several.

        Anchored to `pixel_threshold` when given (the bar spans `threshold ± min(threshold, 1 - threshold)`, so the
        threshold is its middle), else the min-max range of `anomaly_maps`, described by `span_of` in the caption.
        """
        if pixel_threshold is not None:
            half = min(pixel_threshold, 1.0 - pixel_threshold) or 0.5
            return cls(pixel_threshold - half, pixel_threshold + half, pixel_threshold)
        maps = [anomaly_maps] if isinstance(anomaly_maps, np.ndarray) else list(anomaly_maps)
        return cls(float(min(np.min(m) for m in maps)), float(max(np.max(m) for m in maps)), span_of=span_of)

    def normalize(self, values: np.ndarray) -> np.ndarray:
        """`values` scaled to [0, 1] along the bar (clipped)."""
        if self.high <= self.low:
            return np.zeros_like(values, dtype=np.float32)
        return np.clip((values - self.low) / (self.high - self.low), 0.0, 1.0)

    def describe(self) -> str:
        """One line for the caption."""
        if self.threshold is None:
            return f"colours span {self.span_of} {self.low:.4g} to {self.high:.4g}"
        return f"colours {self.low:.3g} to {self.high:.3g}, pixel threshold {self.threshold:.3g} in the middle"


def heatmap_rgb(
    anomaly_map: np.ndarray,
    value_range: tuple[float, float] | None = None,
    colormap_name: str = DEFAULT_COLORMAP,
) -> np.ndarray:
    """Colour an `[H, W]` map -> `[H, W, 3]` uint8.

    Args:
        value_range: `(low, high)` mapped to the colormap ends; defaults to the map's own min and max.
    """
    scale = ColourScale(*value_range) if value_range is not None else ColourScale.for_maps(anomaly_map)
    return (colormap(colormap_name)(scale.normalize(np.asarray(anomaly_map)))[..., :3] * 255).astype(np.uint8)


def overlay(
    image: Image.Image,
    anomaly_map: np.ndarray,
    alpha: float = DEFAULT_ALPHA,
    value_range: tuple[float, float] | None = None,
    colormap_name: str = DEFAULT_COLORMAP,
) -> Image.Image:
    """The heatmap of `anomaly_map` blended over `image` (resized to the map's size), without decorations."""
    base = image.convert("RGB").resize((anomaly_map.shape[1], anomaly_map.shape[0]), Image.Resampling.BILINEAR)
    heat = Image.fromarray(heatmap_rgb(anomaly_map, value_range, colormap_name))
    return Image.blend(base, heat, _check_alpha(alpha))


def _display_size(height: int, width: int) -> tuple[int, int]:
    """`(height, width)` scaled so that the long side lies within `PANEL_LONG_SIDE`, aspect ratio kept."""
    long_side = max(height, width)
    target = min(max(long_side, PANEL_LONG_SIDE[0]), PANEL_LONG_SIDE[1])
    return max(1, round(height * target / long_side)), max(1, round(width * target / long_side))


def _contour(axes, mask: np.ndarray, colour: str, size: tuple[int, int]) -> None:
    mask = np.asarray(mask, dtype=bool)
    if mask.any() and not mask.all():
        resized = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size[::-1], Image.Resampling.NEAREST))
        axes.contour(resized > 127, levels=[0.5], colors=[colour], linewidths=2.0)


def _figure_image(figure: Figure) -> Image.Image:
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


def _decision_line(score: float | None, label: str | None, image_threshold: float | None) -> tuple[str, str]:
    """The caption's first line and its colour."""
    if score is None:
        return "", "black"
    if label is None:
        return f"score {score:.3f}", "black"
    relation = ">=" if label == ANOMALOUS else "<"
    threshold = f" {relation} threshold {image_threshold:.3f}" if image_threshold is not None else ""
    return f"{label.upper()}: score {score:.3f}{threshold}", DECISION_COLOURS.get(label, "black")


def render_panels(
    image: Image.Image,
    anomaly_map: np.ndarray,
    *,
    gt_mask: np.ndarray | None = None,
    score: float | None = None,
    label: str | None = None,
    image_threshold: float | None = None,
    pixel_threshold: float | None = None,
    scale: ColourScale | None = None,
    title: str | None = None,
    show_image: bool = False,
    colormap_name: str = DEFAULT_COLORMAP,
    alpha: float = DEFAULT_ALPHA,
) -> Image.Image:
    """Titled panels at the image's aspect ratio: [image] [ground truth] overlay, a colour bar and a caption.

    Args:
        image: the input picture (any size); the panels keep its aspect ratio, whatever the map's shape.
        anomaly_map: `[H, W]` map, at the image's size or at the model's (square) input size: it is resized to
            the picture.
        gt_mask: ground-truth mask: adds a "ground truth" panel and a green contour on the overlay.
        score, label, image_threshold: the caption's decision line ("ANOMALOUS: score 0.734 >= threshold 0.5").
        pixel_threshold: draws the predicted mask's contour (map >= threshold, white) and anchors the colours.
        scale: colour scale (default: `ColourScale.for_maps(anomaly_map, pixel_threshold)`); pass one shared by
            several images to compare them.
        title: the figure's title (e.g. the file name).
        show_image: add a plain "image" panel before the overlay.
    """
    anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
    alpha = _check_alpha(alpha)
    cmap = colormap(colormap_name)
    scale = scale or ColourScale.for_maps(anomaly_map, pixel_threshold)
    height, width = _display_size(image.height, image.width)
    base = image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    heat_map = np.asarray(Image.fromarray(anomaly_map).resize((width, height), Image.Resampling.BILINEAR))
    heat = (cmap(scale.normalize(heat_map))[..., :3] * 255).astype(np.uint8)
    blended = Image.blend(base, Image.fromarray(heat), alpha)

    panels: list[tuple[str, Image.Image, list[tuple[np.ndarray, str]]]] = []
    if show_image:
        panels.append(("image", base, []))
    if gt_mask is not None:
        panels.append(("ground truth", base, [(np.asarray(gt_mask) > 0, GROUND_TRUTH_CONTOUR_COLOUR)]))
    contours = [(np.asarray(gt_mask) > 0, GROUND_TRUTH_CONTOUR_COLOUR)] if gt_mask is not None else []
    if pixel_threshold is not None:
        contours.append((anomaly_map >= pixel_threshold, PREDICTED_CONTOUR_COLOUR))
    panels.append(("anomaly map", blended, contours))

    figure_width = _MARGIN + len(panels) * (width + _MARGIN) + _COLOUR_BAR_WIDTH
    legend = [scale.describe()]
    if pixel_threshold is not None:
        legend.append("white: predicted defect")
    if gt_mask is not None:
        legend.append("green: ground truth")
    legend_lines = textwrap.wrap("; ".join(legend), width=int((figure_width - 2 * _MARGIN) / _SMALL_CHARACTER_WIDTH))
    caption_height = _DECISION_HEIGHT + _SMALL_LINE_HEIGHT * len(legend_lines) + _MARGIN
    top_height = (_TITLE_HEIGHT if title else 0) + (_PANEL_TITLE_HEIGHT if len(panels) > 1 else _MARGIN)
    figure_height = top_height + height + caption_height
    figure = Figure(figsize=(figure_width / _DPI, figure_height / _DPI), dpi=_DPI, facecolor="white")
    bottom = caption_height / figure_height
    for index, (name, picture, panel_contours) in enumerate(panels):
        left = (_MARGIN + index * (width + _MARGIN)) / figure_width
        axes = figure.add_axes((left, bottom, width / figure_width, height / figure_height))
        axes.imshow(np.asarray(picture), interpolation="nearest")
        for mask, colour in panel_contours:
            _contour(axes, mask, colour, (height, width))
        if len(panels) > 1:
            axes.set_title(name, fontsize=11)
        axes.set_axis_off()
    bar_left = (_MARGIN + len(panels) * (width + _MARGIN) + 8) / figure_width
    bar = figure.add_axes((bar_left, bottom, 16 / figure_width, height / figure_height))
    figure.colorbar(ScalarMappable(norm=Normalize(scale.low, max(scale.high, scale.low + 1e-12)), cmap=cmap), cax=bar)
    ticks = [scale.low, scale.high] if scale.threshold is None else [scale.low, scale.threshold, scale.high]
    bar.set_yticks(ticks, [f"{tick:.3g}" for tick in ticks], fontsize=8)
    if scale.threshold is not None:
        bar.axhline(scale.threshold, color=PREDICTED_CONTOUR_COLOUR, linewidth=2)
    if title:
        figure.suptitle(title, y=1 - 6 / figure_height, va="top", fontsize=12)
    decision, decision_colour = _decision_line(score, label, image_threshold)
    baseline = (caption_height - _DECISION_HEIGHT + 6) / figure_height
    figure.text(_MARGIN / figure_width, baseline, decision, fontsize=11, weight="bold", color=decision_colour)
    figure.text(
        _MARGIN / figure_width, (caption_height - _DECISION_HEIGHT - 2) / figure_height, "\n".join(legend_lines),
        fontsize=8, color="#444444", va="top", linespacing=1.3,
    )  # fmt: skip
    return _figure_image(figure)


def render_prediction(
    image: Image.Image,
    result: Mapping[str, object],
    *,
    image_threshold: float | None = None,
    pixel_threshold: float | None = None,
    title: str | None = None,
    colormap_name: str = DEFAULT_COLORMAP,
    alpha: float = DEFAULT_ALPHA,
) -> Image.Image:
    """The annotated overlay of one "anomaly-detection" pipeline result (`pred_score`, `anomaly_map`, `pred_label`)."""
    return render_panels(
        image,
        np.asarray(result[ANOMALY_MAP]),
        score=float(result[PRED_SCORE]),
        label=result.get(PRED_LABEL),
        image_threshold=image_threshold,
        pixel_threshold=pixel_threshold,
        title=title,
        colormap_name=colormap_name,
        alpha=alpha,
    )


def comparison_panel(
    image: Image.Image,
    anomaly_map: np.ndarray,
    gt_mask: np.ndarray | None = None,
    value_range: tuple[float, float] | None = None,
    **options,
) -> Image.Image:
    """Titled panels image | ground truth (when given) | overlay, with a colour bar (see `render_panels`).

    Args:
        value_range: `(low, high)` of a colour scale shared by several panels (default: this map's range).
        options: further `render_panels` arguments (score, label, thresholds, title, colormap_name, alpha).
    """
    if value_range is not None and "scale" not in options:
        options["scale"] = ColourScale(*value_range, span_of="the shared range")
    return render_panels(image, anomaly_map, gt_mask=gt_mask, show_image=True, **options)


def _curve_points(kind: str, scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    if kind == "roc":
        x_values, y_values, _ = roc_curve(labels, scores)
        return x_values, y_values, float(roc_auc_score(labels, scores))
    y_values, x_values, _ = precision_recall_curve(labels, scores)
    return x_values, y_values, float(average_precision_score(labels, scores))


def draw_curves(
    axes,
    curves: Sequence[tuple[str, np.ndarray, np.ndarray]],
    kind: str,
    title: str,
    metric_values: Mapping[str, float | None] | None = None,
) -> None:
    """Draw ROC or PR curves on matplotlib `axes`, legend entries "name (AUROC 87.3)" (see `plot_curves`)."""
    metric = "AUROC" if kind == "roc" else "AP"
    for name, scores, labels in curves:
        labels = np.asarray(labels).astype(int).ravel()
        if labels.min() == labels.max():
            continue  # undefined for a single class
        x_values, y_values, value = _curve_points(kind, np.asarray(scores, dtype=np.float64).ravel(), labels)
        if metric_values is not None and metric_values.get(name) is not None:
            value = float(metric_values[name])
        axes.plot(x_values, y_values, label=f"{name} ({metric} {100 * value:.1f})")
    if kind == "roc":
        axes.plot([0, 1], [0, 1], color="#bbbbbb", linestyle="--", linewidth=1)
    x_label, y_label = ("false positive rate", "true positive rate") if kind == "roc" else ("recall", "precision")
    axes.set(xlabel=x_label, ylabel=y_label, xlim=(0, 1), ylim=(0, 1.02), title=title)
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="lower right" if kind == "roc" else "lower left", fontsize="small")
    else:
        axes.text(0.5, 0.5, "needs normal and anomalous samples", ha="center", va="center", color="#777777")


def plot_curves(
    curves: Sequence[tuple[str, np.ndarray, np.ndarray]],
    path: str | Path,
    kind: str = "roc",
    title: str = "",
    metric_values: Mapping[str, float | None] | None = None,
) -> Path:
    """Write ROC (`kind="roc"`) or precision-recall (`kind="pr"`) curves, one per `(name, scores, labels)`.

    Each legend entry carries the curve's AUROC or AP in percent: from `metric_values[name]` when given (e.g. the
    report's exact numbers), else computed from the points.
    """
    return plot_curve_pair({title or kind.upper(): (curves, metric_values)}, path, kind)


def plot_curve_pair(
    levels: Mapping[str, tuple[Sequence[tuple[str, np.ndarray, np.ndarray]], Mapping[str, float | None] | None]],
    path: str | Path,
    kind: str = "roc",
) -> Path:
    """Write side-by-side ROC or PR plots, one per level.

    E.g. `{"image-level ROC": (curves, values), "pixel-level ROC": (curves, values)}`; see `plot_curves` for the
    curves and values.
    """
    if kind not in ("roc", "pr"):
        raise ValueError(f"unknown curve kind {kind!r}; use 'roc' or 'pr'")
    figure = Figure(figsize=(5 * len(levels), 5), dpi=_DPI, facecolor="white", layout="constrained")
    for axes, (title, (curves, metric_values)) in zip(
        figure.subplots(1, len(levels), squeeze=False)[0], levels.items(), strict=True
    ):
        draw_curves(axes, curves, kind, title, metric_values)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _figure_image(figure).save(path)
    return path


__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_COLORMAP",
    "ColourScale",
    "check_style",
    "colormap",
    "comparison_panel",
    "draw_curves",
    "heatmap_rgb",
    "overlay",
    "plot_curve_pair",
    "plot_curves",
    "render_panels",
    "render_prediction",
]
