"""The Gradio demo, like the reference's Space: upload images, pick a model, see the heatmap, score and decision.

`build_app` returns a `gradio.Blocks` with an "about" box (the model's source, preset, calibration state and the
paper) and two tabs:

* **Inspect**: one image (uploaded, or one of the synthetic examples) -> the picture beside its annotated anomaly
  map, the score and the decision. The threshold sliders start ticked at the model's calibrated values, and
  unticked (unset) for an uncalibrated model: then there is no decision and no outline until a threshold is
  chosen, and the colours span the map's own range (the shared rule of `cops_hf.visualization`). The opacity
  slider and the thresholds redraw the picture without running the model again. Normal references (good parts,
  optional) make the model few-shot for that image (`detector.set_references`): the map is drawn with them, and
  the zero-shot map without them beside it.
* **Batch**: several images or a whole folder -> a gallery of whole overlays, a table and a CSV file to download,
  with a progress bar.

Every event has a named API endpoint (`/inspect`, `/redraw`, `/score_batch`, `/about`), so the page can be called
from Python with `gradio_client` (see the README). Uploads are capped at `MAX_UPLOAD_BYTES`. Bad uploads give a
readable message in the page (the batch table names each unreadable file) and the app keeps serving.
`launch_app` serves it (`cops-hf app`); `write_space` writes the same app as a Hugging Face Space folder.
Needs the optional extra: ``pip install cops-hf[app]``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .file_utils import bounded_filename, csv_writer, staged_folder
from .image_utils import ImageLoadError, load_image
from .schema import ERROR, IMAGE_PATH, PRED_LABEL, PRED_SCORE, decision_label
from .visualization import DEFAULT_ALPHA, DEFAULT_COLORMAP, render_prediction

APP_TITLE = "CoPS zero-shot anomaly detection"

PAPER_URL = "https://arxiv.org/abs/2508.03447"
"""The CoPS paper (arXiv 2508.03447), linked from the page's "about" box and the Space card."""

EXAMPLE_CATEGORIES = (("ring", "blob"), ("checker", "scratch"), ("bolt", None), ("wood", "foreign_patch"))
"""Synthetic examples shown under the upload: `(category, defect type or None for a normal image)`."""

MAX_UPLOAD_BYTES = 50 * 1024 * 1024
"""Largest file the page accepts (Gradio's `max_file_size`): bounds what a public server or Space receives."""

NO_DECISION = "no decision: set an image threshold"
"""The decision box's text while no image threshold is known."""

BATCH_COLUMNS = [IMAGE_PATH, PRED_SCORE, PRED_LABEL, ERROR]  # the path column holds the upload's file name


def _gradio() -> Any:
    try:
        import gradio
    except ImportError:
        raise ImportError("The app needs Gradio: pip install 'cops-hf[app]'") from None
    return gradio


@dataclass
class AppModel:
    """A model the app serves.

    Attributes:
        name: its name in the dropdown.
        detector: its "anomaly-detection" pipeline.
        image_threshold, pixel_threshold: its calibrated thresholds (`None`: not calibrated).
        source: where it came from (a folder, a Hub id or an official release), for the "about" box.
        preset: the test preset its config records.
    """

    name: str
    detector: Any
    image_threshold: float | None
    pixel_threshold: float | None
    source: str = ""
    preset: str | None = None

    @classmethod
    def from_detector(cls, name: str, detector: Any, source: str = "") -> AppModel:
        """An app model named `name` around a pipeline, starting at the thresholds its config records.

        Args:
            name: the model's name in the dropdown.
            detector: its "anomaly-detection" pipeline.
            source: where it came from (a folder, a Hub id), for the "about" box; default `name`.

        Returns:
            The app model.
        """
        config = detector.model.config
        return cls(name, detector, config.image_threshold, config.pixel_threshold, source or name, config.test_preset)

    @property
    def calibrated(self) -> bool:
        """Whether the model holds a calibrated image threshold."""
        return self.image_threshold is not None


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

    loaded = [AppModel.from_detector(Path(name).name or name, load_detector(name, device=device, dtype=dtype), name)
              for name in models]  # fmt: skip
    if official:
        from .official import load_official

        for name in official:
            model, processor = load_official(name)
            model = model.to(device=resolve_device(device), dtype=resolve_dtype(dtype)).eval()
            detector = pipeline("anomaly-detection", model=model, processor=processor, device=model.device)
            loaded.append(AppModel.from_detector(f"official {name}", detector, f"the official CoPS {name} release"))
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
    """What the Inspect tab keeps between events, so that sliders redraw without running the model.

    Attributes:
        result: the pipeline's result (with the uploaded normal references, when there are some).
        zero_shot_result: the result without the references; `None` when none were uploaded.
        num_references: how many references `result` used.
    """

    image: Image.Image
    result: dict[str, Any]
    title: str
    zero_shot_result: dict[str, Any] | None = None
    num_references: int = 0


def _read_upload(path: str) -> Image.Image:
    """An uploaded image; a `ValueError` naming the file (not the server's temporary path) if it is not one."""
    try:
        return load_image(path)
    except ImageLoadError:
        raise ValueError(
            f"'{Path(path).name}' is not a readable image: it is not an image file, or it is truncated. "
            "Upload a PNG, JPEG, BMP or TIFF picture."
        ) from None


def _threshold(value: float | None) -> float | None:
    """A threshold box's value: `None` when empty (no decision), else a float."""
    return None if value is None else float(value)


class AnomalyApp:
    """The app's logic, independent of the page: each method is one event handler (tested without a browser).

    Thresholds are `None` when unset: no decision, no outline, and colours spanning the map's own range.
    """

    def __init__(self, models: Sequence[AppModel]) -> None:
        if not models:
            raise ValueError("the app needs at least one model")
        self.models = {model.name: model for model in models}
        self._model_lock = threading.Lock()  # references change the shared model: one scoring at a time

    def _score_with_references(self, model_name: str, image: Image.Image, references: Sequence[str]) -> tuple:
        """Score one image with and without normal references.

        The model's memory holds the references only while this image is scored, so other visitors' results stay
        zero-shot.

        Returns:
            `(result with the references, result without them, number of references)`.

        Raises:
            ValueError: a model that ships references of its own, or no readable reference.
        """
        detector = self.models[model_name].detector
        if detector.model.num_references:
            raise ValueError(
                f"{model_name} already holds {detector.model.num_references} normal references of its own; serve "
                "its zero-shot version to try other references here."
            )
        pictures = []
        for path in references:
            try:
                pictures.append(_read_upload(path))
            except ValueError as error:
                raise ValueError(f"Normal reference {error}") from None
        zero_shot = detector(image)
        try:
            count = detector.set_references(pictures)
            return detector(image), zero_shot, count
        finally:
            detector.model.clear_references()

    def initial_thresholds(self, model_name: str) -> tuple[float | None, float | None]:
        """Where the image and pixel threshold boxes start for a model: its calibrated values, else empty."""
        model = self.models[model_name]
        return model.image_threshold, model.pixel_threshold

    def about(self, model_name: str) -> str:
        """The "about" box (markdown) of a model.

        Args:
            model_name: the model's name in the dropdown.

        Returns:
            Its source, preset and calibration state, how to calibrate it, and the paper.
        """
        model = self.models[model_name]
        lines = [
            f"**Model** `{model.name}` from {model.source or model.name}; "
            f"test preset: {model.preset or 'none recorded (the config as saved)'}.",
        ]
        if model.calibrated:
            pixel = f"{model.pixel_threshold:.4g}" if model.pixel_threshold is not None else "none"
            lines.append(f"**Calibrated**: image threshold {model.image_threshold:.4g}, pixel threshold {pixel}.")
        else:
            lines.append(
                "**Not calibrated**: scores are relative, so there is no decision and no outline until you tick "
                "and set a threshold, and the colours span each map's own range. To calibrate on good parts of "
                "your own: "
                f"`cops-hf calibrate --model {model.source or model.name} --normal GOOD_IMAGES/ --output "
                "CALIBRATED` (or `--data ROOT` with labelled images), then serve `CALIBRATED`."
            )
        lines.append(
            f"**Method**: CoPS, Conditional Prompt Synthesis for zero-shot anomaly detection "
            f"([arXiv 2508.03447]({PAPER_URL}))."
        )
        return "\n\n".join(lines)

    def inspect(
        self,
        image_path: str | None,
        model_name: str,
        image_threshold: float | None = None,
        pixel_threshold: float | None = None,
        alpha: float = DEFAULT_ALPHA,
        colormap_name: str = DEFAULT_COLORMAP,
        references: Sequence[str] | None = None,
    ) -> tuple[Image.Image, Image.Image, str, str, Image.Image | None, Inspection]:
        """Score one image.

        Returns:
            `(the picture, annotated anomaly map, score text, decision, the map without the normal references or
            None, state for redrawing)`.

        Args:
            references: paths of normal images of the same kind of part (few-shot: the model's
                `set_references`); the map and score use them, and the zero-shot map is drawn beside for
                comparison.

        Raises:
            ValueError: no image, or an unreadable one or reference (the page shows the message).
        """
        if not image_path:
            raise ValueError("Upload an image first (PNG, JPEG, BMP, TIFF, ...).")
        image = _read_upload(image_path)
        with self._model_lock:
            if references:
                result, zero_shot, count = self._score_with_references(model_name, image, references)
            else:
                result, zero_shot, count = self.models[model_name].detector(image), None, 0
        state = Inspection(image, result, Path(image_path).name, zero_shot, count)
        return (image, *self.redraw(state, image_threshold, pixel_threshold, alpha, colormap_name))

    def redraw(
        self,
        state: Inspection | None,
        image_threshold: float | None = None,
        pixel_threshold: float | None = None,
        alpha: float = DEFAULT_ALPHA,
        colormap_name: str = DEFAULT_COLORMAP,
    ) -> tuple[Image.Image | None, str, str, Image.Image | None, Inspection | None]:
        """Redraw the last inspected image under new threshold / opacity values.

        Returns:
            `(anomaly map, score text, decision, zero-shot map (with references only), state)`.
        """
        if state is None:
            return None, "", "", None, None
        image_threshold, pixel_threshold = _threshold(image_threshold), _threshold(pixel_threshold)

        def draw(result: dict[str, Any], title: str) -> tuple[Image.Image, float, str | None]:
            score = float(result[PRED_SCORE])
            label = decision_label(score, image_threshold) if image_threshold is not None else None
            picture = render_prediction(
                state.image, {**result, PRED_LABEL: label}, image_threshold=image_threshold,
                pixel_threshold=pixel_threshold, title=title, colormap_name=colormap_name, alpha=alpha,
            )  # fmt: skip
            return picture, score, label

        if state.zero_shot_result is None:
            picture, score, label = draw(state.result, state.title)
            return picture, f"{score:.4f}", label or NO_DECISION, None, state
        picture, score, label = draw(state.result, f"{state.title}, with {state.num_references} normal references")
        zero_shot, zero_shot_score, _ = draw(state.zero_shot_result, f"{state.title}, zero-shot")
        score_text = f"{score:.4f} (zero-shot {zero_shot_score:.4f})"
        return picture, score_text, label or NO_DECISION, zero_shot, state

    def score_batch(
        self,
        paths: Sequence[str],
        model_name: str,
        image_threshold: float | None,
        pixel_threshold: float | None,
        output_dir: str | os.PathLike[str],
        progress: Any = None,
        alpha: float = DEFAULT_ALPHA,
    ) -> tuple[list[tuple[str, str]], list[list[Any]], str]:
        """Score many images: `(gallery of (overlay path, caption), table rows, CSV path)`.

        Unreadable files get a row with their error instead of stopping the batch. Without an image threshold the
        label column stays empty.
        """
        if not paths:
            raise ValueError("Upload one or more images, or a folder of them.")
        image_threshold, pixel_threshold = _threshold(image_threshold), _threshold(pixel_threshold)
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
            with self._model_lock:
                result = detector(image)
            score = float(result[PRED_SCORE])
            label = decision_label(score, image_threshold) if image_threshold is not None else None
            picture = render_prediction(
                image, {**result, PRED_LABEL: label}, image_threshold=image_threshold,
                pixel_threshold=pixel_threshold, title=Path(path).name, alpha=alpha,
            )  # fmt: skip
            overlay_path = output / bounded_filename(f"{index:04d}_{Path(path).stem}", ".png")
            picture.save(overlay_path)
            # The picture carries the score and decision in its own caption; the gallery caption names the file.
            gallery.append((str(overlay_path), Path(path).name))
            rows.append([Path(path).name, round(score, 6), label or "", ""])
        csv_path = output / "scores.csv"
        with open(csv_path, "w", newline="") as handle:
            writer = csv_writer(handle)
            writer.writerow(BATCH_COLUMNS)
            writer.writerows(rows)
        return gallery, rows, str(csv_path)


def _in_page_errors(handler: Callable[..., tuple[Any, ...]], num_outputs: int) -> Callable[..., tuple[Any, ...]]:
    """Wrap an event handler so that a `ValueError` becomes a message in the page.

    The error clears the handler's outputs and shows in the page's status line (the last output); the app keeps
    serving. The wrapper keeps the handler's signature, so the API page names its parameters.
    """

    @functools.wraps(handler)
    def handle(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
        try:
            return (*handler(*args, **kwargs), "")
        except ValueError as error:
            return (*[None] * num_outputs, f"⚠️ {error}")

    return handle


_CSS = """
#cops-label textarea, #cops-score textarea { font-size: 1.4em; font-weight: 600; }
#cops-batch-gallery .caption-label { white-space: normal; max-width: 100%; opacity: 0.9; font-size: 0.95em; }
footer { display: none !important; }
"""

SLIDER_START = 0.5
"""Where a threshold slider waits, unticked, for a model without a calibrated value."""


def _chosen(use: bool, value: float) -> float | None:
    """A threshold slider's value when its box is ticked, else `None` (no threshold)."""
    return float(value) if use else None


def build_app(models: Sequence[AppModel], examples_dir: str | os.PathLike[str] | None = None) -> Any:
    """The Gradio Blocks of the demo for `models` (see the module docstring)."""
    gradio = _gradio()
    logic = AnomalyApp(models)
    names = list(logic.models)

    def threshold_controls(model_name):
        """Return (decide?, image threshold, outline?, pixel threshold) for a model.

        The boxes are ticked at a calibrated model's values, unticked for an uncalibrated one.
        """
        image_value, pixel_value = logic.initial_thresholds(model_name)
        return (image_value is not None, SLIDER_START if image_value is None else image_value,
                pixel_value is not None, SLIDER_START if pixel_value is None else pixel_value)  # fmt: skip

    decide_start, image_start, outline_start, pixel_start = threshold_controls(names[0])
    examples_folder = Path(examples_dir) if examples_dir else Path(tempfile.mkdtemp(prefix="cops-examples-"))
    examples = write_example_images(examples_folder)
    batch_folder = Path(tempfile.mkdtemp(prefix="cops-batch-"))

    with gradio.Blocks(title=APP_TITLE) as blocks:
        gradio.Markdown(
            f"# {APP_TITLE}\n"
            "Upload a picture of a part or a texture: CoPS scores how anomalous it is and shows where. "
            "Red means anomalous; the white contour outlines the pixels above the pixel threshold."
        )
        about = gradio.Markdown(logic.about(names[0]), elem_id="cops-about")
        with gradio.Row():
            model_choice = gradio.Dropdown(names, value=names[0], label="Model", scale=2)
            with gradio.Column(scale=2, min_width=220):
                decide = gradio.Checkbox(decide_start, label="Decide at an image threshold", elem_id="cops-decide")
                image_threshold = gradio.Slider(
                    0, 1, value=image_start, step=0.001, label="Image threshold",
                    info="score >= threshold: anomalous (used when ticked)", elem_id="cops-image-threshold",
                )  # fmt: skip
            with gradio.Column(scale=2, min_width=220):
                outline = gradio.Checkbox(outline_start, label="Outline at a pixel threshold", elem_id="cops-outline")
                pixel_threshold = gradio.Slider(
                    0, 1, value=pixel_start, step=0.001, label="Pixel threshold",
                    info="outlines the defect and centres the colours (used when ticked; else colours span the "
                    "map's own range)", elem_id="cops-pixel-threshold",
                )  # fmt: skip
            alpha = gradio.Slider(0, 1, value=DEFAULT_ALPHA, step=0.05, label="Heatmap opacity", scale=1)
        with gradio.Tab("Inspect"):
            with gradio.Row():
                with gradio.Column(scale=2):
                    upload = gradio.File(
                        file_count="single", label="Image file (PNG, JPEG, BMP, TIFF, ...)", elem_id="cops-upload"
                    )
                    status = gradio.Markdown(label="Message", elem_id="cops-status")
                    preview = gradio.Image(
                        label="Your picture", type="pil", format="png", interactive=False, height=300,
                        elem_id="cops-preview",
                    )  # fmt: skip
                    example_gallery = gradio.Gallery(
                        examples, label="Synthetic examples: click one", columns=4, height=160,
                        allow_preview=False, elem_id="cops-examples",
                    )  # fmt: skip
                    references = gradio.File(
                        file_count="multiple", label="Normal references (optional): good parts of the same kind",
                        elem_id="cops-references",
                    )  # fmt: skip
                with gradio.Column(scale=3):
                    picture = gradio.Image(label="Anomaly map", format="png", elem_id="cops-overlay", height=460)
                    with gradio.Row():
                        score = gradio.Textbox(label="Score", elem_id="cops-score", interactive=False)
                        label = gradio.Textbox(label="Decision", elem_id="cops-label", interactive=False)
                    zero_shot = gradio.Image(
                        label="Without the normal references (zero-shot)", format="png", height=360,
                        elem_id="cops-zero-shot",
                    )  # fmt: skip
            state = gradio.State(None)
        with gradio.Tab("Batch"):
            with gradio.Row():
                files = gradio.File(file_count="multiple", label="Images", scale=1)
                folder = gradio.File(file_count="directory", label="...or a folder", scale=1)
            run_batch = gradio.Button("Score all", variant="primary")
            gallery = gradio.Gallery(
                label="Overlays", columns=3, height="auto", object_fit="contain", elem_id="cops-batch-gallery"
            )
            table = gradio.Dataframe(headers=BATCH_COLUMNS, label="Scores", interactive=False)
            download = gradio.File(label="scores.csv")
            batch_status = gradio.Markdown(label="Message")

        thresholds = [decide, image_threshold, outline, pixel_threshold]
        inspect_inputs = [upload, model_choice, *thresholds, alpha, references]
        inspect_outputs = [preview, picture, score, label, zero_shot, state, status]

        def inspect_image(
            image_path, model_name, decide, image_threshold, outline, pixel_threshold, alpha, references=None
        ):
            return logic.inspect(image_path, model_name, _chosen(decide, image_threshold),
                                 _chosen(outline, pixel_threshold), alpha, references=references)  # fmt: skip

        inspect = _in_page_errors(inspect_image, 6)
        upload.change(inspect, inspect_inputs, inspect_outputs, show_progress="full", api_name="inspect")

        def pick_example(event):
            return examples[event.index]

        pick_example.__annotations__ = {"event": gradio.SelectData}  # Gradio passes the click by this annotation
        example_gallery.select(pick_example, None, upload, api_visibility="private")

        def inspect_again(image_path, *options):
            return inspect(image_path, *options) if image_path else (None, None, "", "", None, None, "")

        def model_settings(model_name):
            return *threshold_controls(model_name), logic.about(model_name)

        model_choice.change(
            model_settings, model_choice, [*thresholds, about], api_visibility="private"
        ).then(inspect_again, inspect_inputs, inspect_outputs, api_visibility="private")
        references.change(inspect_again, inspect_inputs, inspect_outputs, api_visibility="private")

        def redraw(state, decide, image_threshold, outline, pixel_threshold, alpha):
            return logic.redraw(state, _chosen(decide, image_threshold), _chosen(outline, pixel_threshold), alpha)

        gradio.on(
            [decide.input, outline.input, image_threshold.release, pixel_threshold.release, alpha.release],
            redraw, [state, *thresholds, alpha], inspect_outputs[1:6], api_name="redraw",
        )  # fmt: skip

        def score_batch(
            images, image_folder, model_name, decide, image_threshold, outline, pixel_threshold, alpha,
            progress=gradio.Progress(),  # noqa: B008 (Gradio injects it)
        ):  # fmt: skip
            paths = [str(item) for item in (images or []) + (image_folder or [])]
            return logic.score_batch(paths, model_name, _chosen(decide, image_threshold),
                                     _chosen(outline, pixel_threshold), batch_folder, progress, alpha)  # fmt: skip

        run_batch.click(
            _in_page_errors(score_batch, 3), [files, folder, model_choice, *thresholds, alpha],
            [gallery, table, download, batch_status], api_name="score_batch",
        )  # fmt: skip
        gradio.api(logic.about, api_name="about")
    return blocks


def launch_app(
    models: Sequence[AppModel],
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    block: bool = True,
    max_file_size: int = MAX_UPLOAD_BYTES,
) -> Any:
    """Serve the demo on `host:port` (default 127.0.0.1: this machine only). Returns the Blocks.

    Args:
        max_file_size: largest upload in bytes (default `MAX_UPLOAD_BYTES`); larger files are refused.
    """
    blocks = build_app(models)
    blocks.queue().launch(
        server_name=host, server_port=port, prevent_thread_lock=not block, quiet=True, css=_CSS,
        footer_links=[], max_file_size=max_file_size,
    )  # fmt: skip
    return blocks


def space_requirements() -> list[str]:
    """The Space's `requirements.txt` lines: the package's own dependencies and its `app` extra.

    They are read from the source tree's pyproject.toml when this package runs from one (it is the newest), else
    from the installed distribution's metadata.

    Returns:
        One requirement per line, e.g. ``transformers>=5.24,<6``.
    """
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        import tomllib

        project = tomllib.loads(pyproject.read_text())["project"] if pyproject.is_file() else {}
    except (ImportError, KeyError, ValueError):
        project = {}
    if project.get("name") == "cops-hf":
        return [*project["dependencies"], *project.get("optional-dependencies", {}).get("app", [])]
    from packaging.requirements import Requirement

    lines = []
    for text in importlib.metadata.requires("cops-hf") or []:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate({"extra": "app"}):
            requirement.marker = None
            lines.append(str(requirement))
    return lines


SPACE_MODELS_FOLDER = "models"
"""Folder of a Space that holds the local models copied into it."""


def _space_model(model: str, folder: Path, taken: set[str]) -> tuple[str, bool]:
    """Place `model` in a Space: a local model folder is saved into `folder/models/NAME`, a Hub id is checked.

    Returns:
        `(path relative to the Space, True)` for a folder, `(model, False)` for a Hub id.
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if Path(model).is_dir():
        from .hub import save_detector
        from .predict import load_model_and_processor

        name = Path(model).resolve().name
        while name in taken:
            name = f"{name}-{len(taken)}"
        taken.add(name)
        trained, processor = load_model_and_processor(model, device="cpu")
        # Saved as every detector folder is (weights, config, code files and any reference memory), so the Space
        # carries what the model needs and nothing else (no checkpoints or logs of a training folder).
        save_detector(trained, processor, folder / SPACE_MODELS_FOLDER / name)
        return f"{SPACE_MODELS_FOLDER}/{name}", True
    try:
        validate_repo_id(model)
    except HFValidationError:
        raise ValueError(
            f"--model {model!r} is neither a model folder on this machine nor a Hub id (namespace/name, letters, "
            "digits, '-', '_', '.'); give a folder, or push it first: cops-hf push FOLDER namespace/name"
        ) from None
    return model, False


def write_space(
    folder: str | os.PathLike[str], models: Sequence[str], title: str = APP_TITLE, *, overwrite: bool = False
) -> Path:
    """Write the app as a Hugging Face Space folder.

    The folder holds `app.py`, `requirements.txt` (the package's own dependencies, see `space_requirements`), the
    card (`README.md`), a copy of the cops_hf package, so the Space runs without installing it, and a copy of each
    local model under `models/`; it is written whole or not at all. Upload it with
    ``hf upload --repo-type space NAMESPACE/SPACE FOLDER``.

    Args:
        models: model folders (saved into the Space) or Hub ids of CoPS models the Space offers (the first one is
            selected).
        overwrite: replace a folder that is not empty (the new Space is staged and renamed into place).

    Raises:
        ValueError: a model that is neither a folder nor a valid Hub id, or a non-empty folder without `overwrite`.
    """
    target = Path(folder)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise ValueError(
            f"{target} is not empty; choose a new folder or pass --overwrite (overwrite=True in Python) to replace "
            "it"
        )
    if not models:
        raise ValueError("a Space needs at least one model: --model FOLDER or --model namespace/name")
    with staged_folder(target) as staging:  # written whole or not at all, as a detector folder is
        _write_space_files(staging, models, title)
    return target


def _write_space_files(folder: Path, models: Sequence[str], title: str) -> None:
    """The files of `write_space`, written into the (empty) `folder`."""
    import gradio

    package = Path(__file__).parent
    taken: set[str] = set()
    placed = [_space_model(model, folder, taken) for model in models]
    shutil.copytree(package, folder / package.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (folder / "app.py").write_text(
        '"""Hugging Face Space of a CoPS anomaly detector (written by cops_hf.app.write_space)."""\n\n'
        "import os\n"
        "from pathlib import Path\n\n"
        "os.chdir(Path(__file__).resolve().parent)  # the models/ folders are relative to the Space\n\n"
        "from cops_hf.app import launch_app, load_app_models  # noqa: E402\n\n"
        f"MODELS = {[path for path, _ in placed]!r}\n\n"
        "launch_app(\n"
        "    load_app_models(MODELS),\n"
        '    host=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"),\n'
        '    port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),\n'
        ")\n"
    )
    (folder / "requirements.txt").write_text("\n".join(space_requirements()) + "\n")
    hub_models = [path for path, local in placed if not local]
    model_lines = "\n".join(
        f"- `{Path(path).name}`, included in this Space (`{path}`)" if local
        else f"- [{path}](https://huggingface.co/{path})"
        for path, local in placed
    )  # fmt: skip
    (folder / "README.md").write_text(
        "---\n"
        f"title: {json.dumps(title)}\n"  # a JSON string is a YAML string: no newline can start a new key
        "emoji: 🔍\n"
        "colorFrom: blue\n"
        "colorTo: red\n"
        "sdk: gradio\n"
        f"sdk_version: {gradio.__version__}\n"
        "app_file: app.py\n"
        "pinned: false\n"
        "license: mit\n"
        + ("models:\n" + "".join(f"- {model}\n" for model in hub_models) if hub_models else "")
        + "tags:\n- anomaly-detection\n- cops\n"
        "---\n\n"
        f"# {title}\n\n"
        f"Zero-shot anomaly detection with [CoPS]({PAPER_URL}) (Conditional Prompt Synthesis) on a frozen CLIP. "
        "Upload an image to see its anomaly score, the decision at the calibrated threshold, and a heatmap of "
        "where the anomaly is; the Batch tab scores many images and gives a CSV.\n\n"
        f"Models:\n{model_lines}\n"
    )


__all__ = [
    "APP_TITLE",
    "MAX_UPLOAD_BYTES",
    "AnomalyApp",
    "AppModel",
    "build_app",
    "launch_app",
    "load_app_models",
    "space_requirements",
    "write_example_images",
    "write_space",
]
