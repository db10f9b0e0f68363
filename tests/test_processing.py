"""CoPSProcessor: images of every kind, masks, bad input, post-processing, save/load, tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, CLIPConfig

from cops_hf import CoPSConfig, CoPSProcessor, ImageLoadError
from cops_hf.modeling_cops import CoPSAnomalyDetectionOutput
from cops_hf.processing_cops import CoPSImageProcessor

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


@pytest.fixture(scope="module")
def processor():
    return CoPSProcessor(CoPSImageProcessor(size=56))


def expected_constant(rgb: tuple[int, int, int], size: int = 56) -> torch.Tensor:
    pixels = torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1) / 255.0
    return ((pixels - MEAN) / STD).expand(3, size, size)


@pytest.mark.parametrize(
    ("image", "rgb"),
    [
        (Image.new("RGB", (40, 30), (200, 10, 90)), (200, 10, 90)),
        (Image.new("L", (33, 70), 120), (120, 120, 120)),
        (Image.new("RGBA", (20, 20), (5, 250, 60, 255)), (5, 250, 60)),
        (Image.new("P", (25, 25), 0), None),
        (np.full((30, 40, 3), 77, dtype=np.uint8), (77, 77, 77)),
        (np.full((30, 40), 0.5, dtype=np.float32), (128, 128, 128)),
        (torch.full((3, 30, 40), 255, dtype=torch.uint8), (255, 255, 255)),
    ],
)
def test_each_image_kind_becomes_normalized_pixels(processor, image, rgb):
    features = processor(images=image)
    assert features["pixel_values"].shape == (1, 3, 56, 56)
    if rgb is not None:
        torch.testing.assert_close(features["pixel_values"][0], expected_constant(rgb), atol=1e-6, rtol=0)


def test_sixteen_bit_images_are_rescaled_not_clipped(processor, tmp_path):
    ramp = np.tile(np.linspace(1000, 4000, 64).astype(np.uint16), (64, 1))
    path = tmp_path / "ct.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    pixels = processor(images=str(path))["pixel_values"][0, 0] * STD[0] + MEAN[0]
    assert pixels.min() < 0.02 and pixels.max() > 0.98  # full range used, nothing clipped to white


def test_paths_pil_and_arrays_agree_and_sizes_are_kept(processor, tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)
    path = tmp_path / "image.png"
    Image.fromarray(array).save(path)
    features = processor(images=[str(path), Image.fromarray(array), array], class_names=["a", "b", "c"])
    # Exact: the three forms decode to the same uint8 pixels, then run the same preprocessing.
    assert torch.equal(features["pixel_values"][0], features["pixel_values"][1])
    assert torch.equal(features["pixel_values"][0], features["pixel_values"][2])
    assert features["original_sizes"] == [(45, 70)] * 3
    assert features["class_names"] == ["a", "b", "c"]


def test_bicubic_resize_without_keeping_aspect(processor):
    image = Image.new("RGB", (112, 56), (0, 0, 0))
    image.paste((255, 255, 255), (56, 0, 112, 56))  # right half white
    pixels = processor(images=image)["pixel_values"][0, 0] * STD[0] + MEAN[0]
    assert pixels[:, :20].max() < 0.01 and pixels[:, 36:].min() > 0.99  # squeezed to 56x56, halves kept


def test_masks_are_binarized_like_the_reference(processor):
    image = Image.new("RGB", (112, 112))
    mask = np.zeros((112, 112), dtype=np.uint8)
    mask[10:60, 20:90] = 1  # any non-zero value is anomalous
    features = processor(images=[image, image], masks=[Image.fromarray(mask), None])
    masks = features["masks"]
    assert masks.shape == (2, 56, 56)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert masks[0, 5:30, 10:45].all() and masks[0].sum() == 25 * 35
    assert masks[1].sum() == 0


def test_bad_inputs_name_the_file(processor, tmp_path):
    with pytest.raises(ImageLoadError, match="missing.png' does not exist"):
        processor(images=str(tmp_path / "missing.png"))
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    with pytest.raises(ImageLoadError, match="notes.png' cannot be read"):
        processor(images=[Image.new("RGB", (8, 8)), str(not_image)])
    truncated = tmp_path / "truncated.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(ImageLoadError, match="truncated.png"):
        processor(images=str(truncated))
    with pytest.raises(ImageLoadError, match="missing_mask.png' does not exist"):
        processor(images=Image.new("RGB", (20, 20)), masks=str(tmp_path / "missing_mask.png"))
    with pytest.raises(ImageLoadError, match="shape"):
        processor(images=np.zeros((5, 5, 7), dtype=np.uint8))
    with pytest.raises(ImageLoadError, match=r"\[0, 1\]"):
        processor(images=np.full((4, 4), 3.0))
    with pytest.raises(ValueError, match="2 class names for 1 images"):
        processor(images=Image.new("RGB", (8, 8)), class_names=["a", "b"])


def test_post_process_resizes_and_thresholds(processor):
    maps = torch.zeros(2, 56, 56)
    maps[0, :, 28:] = 1.0
    outputs = CoPSAnomalyDetectionOutput(image_scores=torch.tensor([0.9, 0.2]), anomaly_maps=maps)
    results = processor.post_process_anomaly_detection(
        outputs, target_sizes=[(100, 200), (56, 56)], threshold=0.5, image_threshold=0.5
    )
    assert results[0]["anomaly_map"].shape == (100, 200) and results[1]["anomaly_map"].shape == (56, 56)
    assert results[0]["mask"][:, :90].sum() == 0 and results[0]["mask"][:, 110:].all()
    assert [r["label"] for r in results] == ["anomalous", "normal"]
    assert results[0]["score"] == pytest.approx(0.9)
    assert "mask" not in processor.post_process_anomaly_detection(outputs)[0]


def test_tokenizer_gives_the_prompt_template(processor):
    # The reference builds its prompts from these ids: start, 14 "X", ".", end.
    assert processor.prompt_template_ids(14) == [49406] + [343] * 14 + [269, 49407]
    assert processor.prompt_suffix_token_ids() == [269]
    clip = CLIPConfig(text_config={"num_hidden_layers": 2}, vision_config={"num_hidden_layers": 2})
    built = CoPSConfig.from_clip_config(clip, image_size=224, prototype_attention_heads=8)  # the config's constant
    assert built.prompt_suffix_token_ids == processor.prompt_suffix_token_ids() == CoPSConfig().prompt_suffix_token_ids
    assert processor(text="a photo of a cat")["input_ids"][0].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert processor(text="a cat", return_tensors="np")["input_ids"].tolist() == [[49406, 320, 2368, 49407]]


def test_return_tensors_numpy_or_torch(processor):
    image, mask = np.zeros((20, 30, 3), dtype=np.uint8), np.ones((20, 30), dtype=np.uint8)
    as_numpy = processor(images=image, masks=mask, return_tensors="np")
    as_torch = processor(images=image, masks=mask)
    assert isinstance(as_numpy["pixel_values"], np.ndarray) and isinstance(as_numpy["masks"], np.ndarray)
    # Exact: one preprocessing run, converted to numpy without arithmetic.
    np.testing.assert_array_equal(as_numpy["pixel_values"], as_torch["pixel_values"].numpy())
    np.testing.assert_array_equal(as_numpy["masks"], as_torch["masks"].numpy())
    assert as_numpy["original_sizes"] == [(20, 30)]
    with pytest.raises(ValueError, match="return_tensors='tf' is not supported"):
        processor(images=image, return_tensors="tf")


def test_save_and_load(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    for loaded in (CoPSProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)):
        assert isinstance(loaded, CoPSProcessor)
        assert loaded.image_processor.size == 56
        image = Image.new("RGB", (30, 30), (9, 99, 199))
        # Exact: the same preprocessing settings on the same image.
        assert torch.equal(loaded(images=image)["pixel_values"], processor(images=image)["pixel_values"])
