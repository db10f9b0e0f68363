"""The pictures, checked by their pixels: overlay colours, colour bar, contours, captions, aspect ratio, curves."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image

from cops_hf.visualization import (
    DECISION_COLOURS,
    ColourScale,
    comparison_panel,
    draw_curves,
    overlay,
    plot_curve_pair,
    render_panels,
)


def _hot_spot_map(height: int = 120, width: int = 180, low: float = 0.009, high: float = 0.034) -> np.ndarray:
    """A map like the demo model's: values in [low, high], a bright blob right of the centre."""
    rows, columns = np.mgrid[:height, :width]
    blob = np.exp(-((rows - height / 2) ** 2 + (columns - 2 * width / 3) ** 2) / (2 * (height / 8) ** 2))
    return (low + (high - low) * blob).astype(np.float32)


def _near(pixels: np.ndarray, colour: tuple[float, float, float], tolerance: int = 40) -> np.ndarray:
    return np.abs(pixels.astype(int) - np.asarray(colour) * 255).max(axis=-1) <= tolerance


def _colour_bar_column(picture: np.ndarray) -> int:
    """The first column (from the right) whose pixels run from the colormap's top colour down to its bottom one."""
    jet = colormaps["jet"]
    for column in range(picture.shape[1] - 1, 0, -1):
        strip = picture[:, column]
        top, bottom = np.flatnonzero(_near(strip, jet(1.0)[:3])), np.flatnonzero(_near(strip, jet(0.0)[:3]))
        if len(top) > 3 and len(bottom) > 3 and top.max() < bottom.min():
            return column
    raise AssertionError("no colour bar found")


def _white_inside_overlay(picture: np.ndarray) -> int:
    """White pixels within the bounding box of the heatmap's colourful pixels (the colour bar excluded)."""
    colourful = (picture.max(axis=-1).astype(int) - picture.min(axis=-1)) > 60
    colourful[:, _colour_bar_column(picture) - 30 :] = False
    rows, columns = colourful.nonzero()
    inside = picture[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1]
    return int(_near(inside, (1.0, 1.0, 1.0), 5).sum())


def test_overlay_uses_the_maps_own_range_by_default():
    anomaly_map = _hot_spot_map()
    picture = np.asarray(overlay(Image.new("RGB", (90, 60), "gray"), anomaly_map, alpha=1.0))
    assert picture.shape == (120, 180, 3)
    jet = colormaps["jet"]
    assert _near(picture[60, 120], jet(1.0)[:3], 10).all()  # the blob's peak is the top colour
    assert _near(picture[0, 0], jet(0.0)[:3], 10).all()  # the map's minimum is the bottom colour, not a flat blue


def test_annotated_overlay_has_colour_bar_heatmap_contour_and_decision():
    anomaly_map = _hot_spot_map()
    picture = np.asarray(
        render_panels(
            Image.new("RGB", (180, 120), (128, 128, 128)), anomaly_map, score=0.73, label="anomalous",
            image_threshold=0.5, pixel_threshold=0.02, title="part.png", alpha=0.6,
        )
    )  # fmt: skip
    height, width = picture.shape[:2]
    assert width > height  # drawn at the image's 3:2 aspect ratio, not squashed
    bar = _colour_bar_column(picture)
    assert bar > width * 0.8
    heat = picture[: int(height * 0.85), : bar - 40]  # the overlay, above the caption
    red = (heat[..., 0] > 150) & (heat[..., 2] < 100)
    blue = (heat[..., 2] > 110) & (heat[..., 0] < 100)
    assert red.sum() > 200 and blue.sum() > 2000
    blue_columns = blue.nonzero()[1]
    assert red.nonzero()[1].mean() > (blue_columns.min() + blue_columns.max()) / 2 + 40  # the blob is right of centre
    assert _white_inside_overlay(picture) > 100  # the white contour of the predicted mask
    decision = np.asarray([int(DECISION_COLOURS["anomalous"][i : i + 2], 16) for i in (1, 3, 5)]) / 255
    caption = picture[int(height * 0.8) :]
    assert _near(caption, tuple(decision), 30).sum() > 50  # the red "ANOMALOUS: score ..." line


def test_threshold_anchors_the_colour_scale():
    anomaly_map = _hot_spot_map()
    anchored = ColourScale.for_maps(anomaly_map, pixel_threshold=0.03)
    assert (anchored.low, anchored.high, anchored.threshold) == pytest.approx((0.0, 0.06, 0.03))
    assert "pixel threshold 0.03" in anchored.describe()
    own = ColourScale.for_maps(anomaly_map)
    assert (own.low, own.high) == pytest.approx((0.009, 0.034), abs=1e-4)
    assert "0.009" in own.describe() and "0.034" in own.describe()
    without_contour = np.asarray(render_panels(Image.new("RGB", (180, 120), "gray"), anomaly_map, alpha=0.6))
    with_contour = np.asarray(
        render_panels(Image.new("RGB", (180, 120), "gray"), anomaly_map, pixel_threshold=0.02, alpha=0.6)
    )
    assert _white_inside_overlay(without_contour) == 0 and _white_inside_overlay(with_contour) > 100


def test_evaluation_panel_is_titled_and_keeps_the_aspect_ratio():
    tall_map = _hot_spot_map(height=200, width=100)
    mask = tall_map > 0.025
    panel = np.asarray(comparison_panel(Image.new("RGB", (100, 200), "gray"), tall_map, mask))
    assert panel.shape[0] > panel.shape[1] / 3 * 1.5  # three tall panels side by side
    green = (panel[..., 1] > 180) & (panel[..., 0] < 80) & (panel[..., 2] < 80)
    assert green.sum() > 100  # the ground-truth contour


def test_panels_keep_the_pictures_aspect_ratio_for_a_square_map():
    """A 128x96 picture with the model's square map is drawn 4:3, not square (issue 20: it was drawn 320x320)."""
    square_map = _hot_spot_map(height=98, width=98)
    picture = np.asarray(render_panels(Image.new("RGB", (128, 96), "gray"), square_map, alpha=0.6))
    colourful = (picture.max(axis=-1).astype(int) - picture.min(axis=-1)) > 60
    colourful[:, _colour_bar_column(picture) - 30 :] = False
    rows, columns = colourful.nonzero()
    height, width = rows.max() - rows.min() + 1, columns.max() - columns.min() + 1
    assert width / height == pytest.approx(128 / 96, rel=0.03) and width >= 320


def test_curves_carry_metrics_and_pixel_level_sits_beside(tmp_path):
    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    figure = Figure()
    axes = figure.add_subplot()
    draw_curves(axes, [("ring", scores, labels)], "roc", "image-level ROC")
    draw_curves(axes, [("bolt", scores, labels)], "pr", "image-level PR", {"bolt": 0.5})
    texts = [text.get_text() for text in axes.get_legend().get_texts()]
    assert texts == ["ring (AUROC 88.9)", "bolt (AP 50.0)"]
    path = plot_curve_pair(
        {"image-level ROC": ([("ring", scores, labels)], None), "pixel-level ROC": ([("ring", scores, labels)], None)},
        tmp_path / "roc.png",
    )
    picture = np.asarray(Image.open(path).convert("L"))
    assert picture.shape[1] >= 2 * picture.shape[0] * 0.9 and picture.std() > 10
