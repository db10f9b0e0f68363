"""The Gradio demo, like the reference's Space: upload images, pick a model, see the heatmap, score and decision.

`build_app` returns a `gradio.Blocks` with two tabs:

* **Inspect**: one image (uploaded, or one of the synthetic examples) -> the annotated overlay, the score and the
  label. The threshold sliders start at the model's calibrated values; the opacity and threshold sliders redraw
  the picture without running the model again.
* **Batch**: several images or a whole folder -> a gallery of overlays, a table and a CSV file to download, with a
  progress bar.

Bad uploads give a readable message in the page (the batch table names each unreadable file) and the app keeps
serving. `launch_app` serves it (`cops-hf app`); `write_space` writes the same app as a Hugging Face Space folder.
Needs the optional extra: ``pip install cops-hf[app]``.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .file_utils import staged_folder
from .image_utils import ImageLoadError, load_image
from .schema import ERROR, IMAGE_PATH, PRED_LABEL, PRED_SCORE, decision_label
from .visualization import DEFAULT_ALPHA, DEFAULT_COLORMAP, render_prediction

APP_TITLE = "CoPS zero-shot anomaly detection"

EXAMPLE_CATEGORIES = (("ring", "blob"), ("checker", "scratch"), ("bolt", None), ("wood", "foreign_patch"))
"""Synthetic examples shown under the upload: `(category, defect type or None for a normal image)`."""

UNCALIBRATED_THRESHOLD = 0.5
"""Where a threshold slider starts when the model holds no calibrated value."""

BATCH_COLUMNS = [IMAGE_PATH, PRED_SCORE, PRED_LABEL, ERROR]  # the path column holds the upload's file name


def _gradio() -> Any:
    try:
        import gradio
    except ImportError:
        raise ImportError("The app needs Gradio: pip install 'cops-hf[app]'") from None
    return gradio


@dataclass
class AppModel:
    """A model the app serves: its name in the dropdown, its pipeline and its calibrated thresholds."""

    name: str
    detector: Any
    image_threshold: float | None
    pixel_threshold: float | None

    @classmethod
    def from_detector(cls, name: str, detector: Any) -> AppModel:
        """An app model named `name` around a pipeline, starting at the thresholds its config records."""
        config = detector.model.config
        return cls(name, detector, config.image_threshold, config.pixel_threshold)


def load_app_models(
    models: Sequence[str] = (),
    official: Sequence[str] = (),
    *,
    device: str | None = None,
    dtype: str | None = None,
) -> list[AppModel]:
    """Pipelines for model folders, Hub ids and official detectors, named after the folder or id.

    Official detectors ("visa", "mvtec") are downloaded and converted by `cops_hf.official.load_official`.
    """
    from transformers import pipeline

    from .devices import resolve_device, resolve_dtype
    from .predict import load_detector

    loaded = [AppModel.from_detector(Path(name).name or name, load_detector(name, device=device, dtype=dtype))
              for name in models]  # fmt: skip
    if official:
        from .official import load_official

        for name in official:
            model, processor = load_official(name)
            model = model.to(device=resolve_device(device), dtype=resolve_dtype(dtype)).eval()
            detector = pipeline("anomaly-detection", model=model, processor=processor, device=model.device)
            loaded.append(AppModel.from_detector(f"official {name}", detector))
    if not loaded:
        raise ValueError("give at least one model: --model DIR (repeatable) or --official visa|mvtec")
    return loaded


def write_example_images(folder: str | os.PathLike[str], image_size: int = 256, seed: int = 0) -> list[str]:
    """Write the synthetic example images (`EXAMPLE_CATEGORIES`) into `folder` and return their paths."""
    from .data.synthetic import render_synthetic_sample

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (category, defect) in enumerate(EXAMPLE_CATEGORIES):
        sample = render_synthetic_sample(category, index, image_size=image_size, seed=seed, defect_type=defect)
        path = folder / f"{category}_{defect or 'normal'}.png"
        Image.fromarray(sample.image).save(path)
        paths.append(str(path))
    return paths


@dataclass
class Inspection:
    """What the Inspect tab keeps between events, so that sliders redraw without running the model."""

    image: Image.Image
    result: dict[str, Any]
    title: str


def _read_upload(path: str) -> Image.Image:
    """An uploaded image; a `ValueError` naming the file (not the server's temporary path) if it is not one."""
    try:
        return load_image(path)
    except ImageLoadError:
        raise ValueError(
            f"'{Path(path).name}' is not a readable image: it is not an image file, or it is truncated. "
            "Upload a PNG, JPEG, BMP or TIFF picture."
        ) from None


class AnomalyApp:
    """The app's logic, independent of the page: each method is one event handler (tested without a browser)."""

    def __init__(self, models: Sequence[AppModel]) -> None:
        if not models:
            raise ValueError("the app needs at least one model")
        self.models = {model.name: model for model in models}

    def initial_thresholds(self, model_name: str) -> tuple[float, float]:
        """Where the image and pixel threshold sliders start for a model: its calibrated values."""
        model = self.models[model_name]
        return (
            model.image_threshold if model.image_threshold is not None else UNCALIBRATED_THRESHOLD,
            model.pixel_threshold if model.pixel_threshold is not None else UNCALIBRATED_THRESHOLD,
        )

    def inspect(
        self,
        image_path: str | None,
        model_name: str,
        image_threshold: float,
        pixel_threshold: float,
        alpha: float = DEFAULT_ALPHA,
        colormap_name: str = DEFAULT_COLORMAP,
    ) -> tuple[Image.Image, str, str, Inspection]:
        """Score one image: `(annotated overlay, score text, label, state for redrawing)`.

        Raises:
            ValueError: no image, or an unreadable one (the page shows the message).
        """
        if not image_path:
            raise ValueError("Upload an image first (PNG, JPEG, BMP, TIFF, ...).")
        image = _read_upload(image_path)
        result = self.models[model_name].detector(image)
        state = Inspection(image=image, result=result, title=Path(image_path).name)
        return self.redraw(state, image_threshold, pixel_threshold, alpha, colormap_name)

    def redraw(
        self,
        state: Inspection | None,
        image_threshold: float,
        pixel_threshold: float,
        alpha: float = DEFAULT_ALPHA,
        colormap_name: str = DEFAULT_COLORMAP,
    ) -> tuple[Image.Image | None, str, str, Inspection | None]:
        """The picture, score and label of the last inspected image under new slider values."""
        if state is None:
            return None, "", "", None
        score = float(state.result[PRED_SCORE])
        label = decision_label(score, image_threshold)
        result = {**state.result, PRED_LABEL: label}
        picture = render_prediction(
            state.image, result, image_threshold=image_threshold, pixel_threshold=pixel_threshold,
            title=state.title, colormap_name=colormap_name, alpha=alpha,
        )  # fmt: skip
        return picture, f"{score:.4f}", label, state

    def score_batch(
        self,
        paths: Sequence[str],
        model_name: str,
        image_threshold: float,
        pixel_threshold: float,
        output_dir: str | os.PathLike[str],
        progress: Any = None,
        alpha: float = DEFAULT_ALPHA,
    ) -> tuple[list[tuple[str, str]], list[list[Any]], str]:
        """Score many images: `(gallery of (overlay path, caption), table rows, CSV path)`.

        Unreadable files get a row with their error instead of stopping the batch.
        """
        if not paths:
            raise ValueError("Upload one or more images, or a folder of them.")
        output = Path(output_dir)
        output.mkdir(parents=True, exist_ok=True)
        detector = self.models[model_name].detector
        gallery, rows = [], []
        for index, path in enumerate(paths):
            if progress is not None:
                progress((index, len(paths)), desc=f"scoring {Path(path).name}")
            try:
                image = _read_upload(path)
            except ValueError as error:
                rows.append([Path(path).name, None, "", str(error)])
                continue
            result = detector(image)
            score = float(result[PRED_SCORE])
            label = decision_label(score, image_threshold)
            picture = render_prediction(
                image, {**result, PRED_LABEL: label}, image_threshold=image_threshold,
                pixel_threshold=pixel_threshold, title=Path(path).name, alpha=alpha,
            )  # fmt: skip
            overlay_path = output / f"{index:04d}_{Path(path).stem}.png"
            picture.save(overlay_path)
            gallery.append((str(overlay_path), f"{Path(path).name}: {score:.4f} {label}"))
            rows.append([Path(path).name, round(score, 6), label, ""])
        csv_path = output / "scores.csv"
        with open(csv_path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(BATCH_COLUMNS)
            writer.writerows(rows)
        return gallery, rows, str(csv_path)


def _in_page_errors(handler: Any, num_outputs: int) -> Any:
    """Wrap an event handler so that a `ValueError` becomes a message in the page.

    The error clears the handler's outputs and shows in the page's status line (the last output); the app keeps
    serving.
    """

    def handle(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
        try:
            return (*handler(*args, **kwargs), "")
        except ValueError as error:
            return (*[None] * num_outputs, f"⚠️ {error}")

    return handle


_CSS = """
#cops-label textarea, #cops-score textarea { font-size: 1.4em; font-weight: 600; }
footer { display: none !important; }
"""


def build_app(models: Sequence[AppModel], examples_dir: str | os.PathLike[str] | None = None) -> Any:
    """The Gradio Blocks of the demo for `models` (see the module docstring)."""
    gradio = _gradio()
    logic = AnomalyApp(models)
    names = list(logic.models)
    image_start, pixel_start = logic.initial_thresholds(names[0])
    examples_folder = Path(examples_dir) if examples_dir else Path(tempfile.mkdtemp(prefix="cops-examples-"))
    examples = write_example_images(examples_folder)
    batch_folder = Path(tempfile.mkdtemp(prefix="cops-batch-"))

    with gradio.Blocks(title=APP_TITLE) as blocks:
        gradio.Markdown(
            f"# {APP_TITLE}\n"
            "Upload a picture of a part or a texture: CoPS scores how anomalous it is and shows where. "
            "Red means anomalous; the white contour outlines the pixels above the pixel threshold."
        )
        with gradio.Row():
            model_choice = gradio.Dropdown(names, value=names[0], label="Model", scale=2)
            image_threshold = gradio.Slider(
                0, 1, value=image_start, step=0.001, label="Image threshold",
                info="score >= threshold: anomalous", elem_id="cops-image-threshold", scale=2,
            )  # fmt: skip
            pixel_threshold = gradio.Slider(
                0, 1, value=pixel_start, step=0.001, label="Pixel threshold",
                info="outlines the defect", elem_id="cops-pixel-threshold", scale=2,
            )  # fmt: skip
            alpha = gradio.Slider(0, 1, value=DEFAULT_ALPHA, step=0.05, label="Heatmap opacity", scale=1)
        with gradio.Tab("Inspect"):
            with gradio.Row():
                with gradio.Column(scale=2):
                    upload = gradio.File(
                        file_count="single", label="Image file (PNG, JPEG, BMP, TIFF, ...)", elem_id="cops-upload"
                    )
                    status = gradio.Markdown(elem_id="cops-status")
                    example_gallery = gradio.Gallery(
                        examples, label="Synthetic examples: click one", columns=4, height=160,
                        allow_preview=False, elem_id="cops-examples",
                    )  # fmt: skip
                with gradio.Column(scale=3):
                    picture = gradio.Image(label="Anomaly map", format="png", elem_id="cops-overlay", height=460)
                    with gradio.Row():
                        score = gradio.Textbox(label="Score", elem_id="cops-score", interactive=False)
                        label = gradio.Textbox(label="Decision", elem_id="cops-label", interactive=False)
            state = gradio.State(None)
        with gradio.Tab("Batch"):
            with gradio.Row():
                files = gradio.File(file_count="multiple", label="Images", scale=1)
                folder = gradio.File(file_count="directory", label="...or a folder", scale=1)
            run_batch = gradio.Button("Score all", variant="primary")
            gallery = gradio.Gallery(label="Overlays", columns=4, height="auto")
            table = gradio.Dataframe(headers=BATCH_COLUMNS, label="Scores", interactive=False)
            download = gradio.File(label="scores.csv")
            batch_status = gradio.Markdown()

        inspect_inputs = [upload, model_choice, image_threshold, pixel_threshold, alpha]
        inspect_outputs = [picture, score, label, state, status]
        inspect = _in_page_errors(logic.inspect, 4)
        upload.change(inspect, inspect_inputs, inspect_outputs, show_progress="full")

        def pick_example(event):
            return examples[event.index]

        pick_example.__annotations__ = {"event": gradio.SelectData}  # Gradio passes the click by this annotation
        example_gallery.select(pick_example, None, upload)
        model_choice.change(
            logic.initial_thresholds, model_choice, [image_threshold, pixel_threshold]
        ).then(lambda *args: inspect(*args) if args[0] else (None, "", "", None, ""), inspect_inputs,
               inspect_outputs)  # fmt: skip
        for slider in (image_threshold, pixel_threshold, alpha):
            slider.release(logic.redraw, [state, image_threshold, pixel_threshold, alpha], inspect_outputs[:4])

        def batch(uploaded, uploaded_folder, name, image_limit, pixel_limit, opacity, progress=gradio.Progress()):  # noqa: B008 (Gradio injects it)
            paths = [str(item) for item in (uploaded or []) + (uploaded_folder or [])]
            return logic.score_batch(paths, name, image_limit, pixel_limit, batch_folder, progress, opacity)

        run_batch.click(
            _in_page_errors(batch, 3), [files, folder, model_choice, image_threshold, pixel_threshold, alpha],
            [gallery, table, download, batch_status],
        )  # fmt: skip
    return blocks


def launch_app(
    models: Sequence[AppModel], *, host: str = "127.0.0.1", port: int | None = None, block: bool = True
) -> Any:
    """Serve the demo on `host:port` (default 127.0.0.1: this machine only). Returns the Blocks."""
    blocks = build_app(models)
    blocks.queue().launch(
        server_name=host, server_port=port, prevent_thread_lock=not block, quiet=True, css=_CSS,
        footer_links=[],
    )  # fmt: skip
    return blocks


SPACE_REQUIREMENTS = [
    "torch>=2.1",
    "transformers>=5.0,<6",
    "huggingface_hub>=1.0",
    "safetensors>=0.4",
    "datasets>=3.0",
    "accelerate>=1.0",
    "scikit-learn>=1.3",
    "scipy>=1.10",
    "matplotlib>=3.7",
    "gradio>=5",
]


def write_space(
    folder: str | os.PathLike[str], models: Sequence[str], title: str = APP_TITLE, *, overwrite: bool = False
) -> Path:
    """Write the app as a Hugging Face Space folder.

    The folder holds `app.py`, `requirements.txt`, the card (`README.md`) and a copy of the cops_hf package, so the
    Space runs without installing it; it is written whole or not at all. Upload it with
    ``hf upload --repo-type space NAMESPACE/SPACE FOLDER``.

    Args:
        models: Hub ids of the CoPS models the Space offers (the first one is selected).
    """
    target = Path(folder)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise ValueError(f"{target} is not empty; choose a new folder or pass overwrite=True")
    if not models:
        raise ValueError("a Space needs at least one model id")
    with staged_folder(target) as staging:  # written whole or not at all, as a detector folder is
        _write_space_files(staging, models, title)
    return target


def _write_space_files(folder: Path, models: Sequence[str], title: str) -> None:
    """The files of `write_space`, written into the (empty) `folder`."""
    import gradio

    package = Path(__file__).parent
    shutil.copytree(package, folder / package.name, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))  # fmt: skip
    (folder / "app.py").write_text(
        '"""Hugging Face Space of a CoPS anomaly detector (written by cops_hf.app.write_space)."""\n\n'
        "from cops_hf.app import launch_app, load_app_models\n\n"
        f"MODELS = {list(models)!r}\n\n"
        'launch_app(load_app_models(MODELS), host="0.0.0.0", port=7860)\n'
    )
    (folder / "requirements.txt").write_text("\n".join(SPACE_REQUIREMENTS) + "\n")
    model_lines = "\n".join(f"- [{model}](https://huggingface.co/{model})" for model in models)
    (folder / "README.md").write_text(
        "---\n"
        f"title: {title}\n"
        "emoji: 🔍\n"
        "colorFrom: blue\n"
        "colorTo: red\n"
        "sdk: gradio\n"
        f"sdk_version: {gradio.__version__}\n"
        "app_file: app.py\n"
        "pinned: false\n"
        "license: mit\n"
        "models:\n" + "".join(f"- {model}\n" for model in models) + "tags:\n- anomaly-detection\n- cops\n"
        "---\n\n"
        f"# {title}\n\n"
        "Zero-shot anomaly detection with CoPS (Conditional Prompt Synthesis) on a frozen CLIP. Upload an image "
        "to see its anomaly score, the decision at the calibrated threshold, and a heatmap of where the anomaly "
        "is; the Batch tab scores many images and gives a CSV.\n\n"
        f"Models:\n{model_lines}\n"
    )


__all__ = [
    "APP_TITLE",
    "AnomalyApp",
    "AppModel",
    "build_app",
    "launch_app",
    "load_app_models",
    "write_example_images",
    "write_space",
]
