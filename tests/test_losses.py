"""The training objective's terms, each checked against a computation by hand, and `cops_objective`."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cops_hf.losses import (
    LOSS_TERMS,
    SEGMENTATION_LOSS_WEIGHT,
    cops_objective,
    dice_loss,
    focal_loss,
    kl_divergence,
    prototype_gather_scatter,
    reconstruction_loss,
)


def test_focal_loss_clamps_the_target_and_smooths_pt_as_the_reference() -> None:
    # One image, 1 x 2 pixels: an anomalous pixel predicted 0.8 anomalous, a normal pixel predicted 0.6 normal.
    state_probs = torch.tensor([[[[0.2, 0.6]], [[0.8, 0.4]]]], dtype=torch.float64)  # [1, 2, 1, 2]
    masks = torch.tensor([[[1, 0]]])
    high, low = 1 - 1e-5, 1e-5
    pt_anomalous = 0.2 * low + 0.8 * high + 1e-5
    pt_normal = 0.6 * high + 0.4 * low + 1e-5
    expected = sum(-((1 - pt) ** 2) * math.log(pt) for pt in (pt_anomalous, pt_normal)) / 2
    assert focal_loss(state_probs, masks).item() == pytest.approx(expected, rel=1e-12)


def test_dice_loss_by_hand() -> None:
    probs = torch.tensor([[[0.5, 1.0], [0.0, 0.25]]], dtype=torch.float64)
    targets = torch.tensor([[[1, 1], [0, 0]]])
    expected = 1 - (2 * 1.5 + 1) / (1.75 + 2 + 1)
    assert dice_loss(probs, targets).item() == pytest.approx(expected, rel=1e-12)


def test_kl_and_reconstruction_follow_the_reference() -> None:
    # Exact: KL of a zero mean and zero log-variance is a sum of exact zeros.
    assert kl_divergence(torch.zeros(3, 4), torch.zeros(3, 4)).item() == 0.0
    mean, log_var = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(2.0)]])
    assert kl_divergence(mean, log_var).item() == pytest.approx(-0.5 * ((1 + 0 - 1 - 1) + (1 + math.log(2) - 2)))
    image_embeds = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    class_tokens = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    # Every image against every class token (the reference's broadcasting), averaged over (b, b', d).
    expected = sum(
        (image_embeds[image] - class_tokens[token]).pow(2).sum().item() for image in range(2) for token in range(2)
    ) / (2 * 2 * 2)
    assert reconstruction_loss(image_embeds, class_tokens).item() == pytest.approx(expected)


def test_gather_and_scatter_average_over_their_patches() -> None:
    normal_distances = torch.tensor([[0.1, 0.2, 0.3]])
    anomalous_distances = torch.tensor([[0.7, 0.8, 0.9]])
    gather, scatter = prototype_gather_scatter(normal_distances, anomalous_distances, torch.tensor([[0, 1, 0]]))
    assert (gather.item(), scatter.item()) == pytest.approx((0.2, 0.8))
    gather, scatter = prototype_gather_scatter(normal_distances, anomalous_distances, torch.zeros(1, 3))
    assert (gather.item(), scatter.item()) == pytest.approx((0.2, 0.0))


def objective_inputs(masks: torch.Tensor | None, use_recon_loss: bool = True) -> dict:
    generator = torch.Generator().manual_seed(0)
    batch, layers, size, patch, dim = 2, 2, 4, 2, 3
    state_logits = torch.randn(batch, layers, 2, size, size, generator=generator)
    return {
        "image_logits": torch.randn(batch, 2, generator=generator),
        "labels": torch.tensor([0, 1]),
        "state_maps": state_logits.softmax(dim=2),
        "masks": masks,
        "normal_distances": torch.rand(batch, (size // patch) ** 2, generator=generator),
        "anomalous_distances": torch.rand(batch, (size // patch) ** 2, generator=generator),
        "posterior_mean": torch.randn(batch, dim, generator=generator),
        "posterior_log_var": torch.randn(batch, dim, generator=generator),
        "image_embeds": torch.randn(batch, dim, generator=generator),
        "class_tokens": torch.randn(batch, dim, generator=generator),
        "patch_size": patch,
        "use_recon_loss": use_recon_loss,
    }


def test_objective_is_the_weighted_sum_of_its_terms() -> None:
    masks = torch.zeros(2, 4, 4)
    masks[1, 0, 1] = 1.0  # one anomalous pixel: patch 0 of image 1 is anomalous
    inputs = objective_inputs(masks)
    loss, terms = cops_objective(**inputs)
    assert tuple(terms) == LOSS_TERMS
    weights = {"seg": SEGMENTATION_LOSS_WEIGHT}
    assert loss.item() == pytest.approx(sum(weights.get(name, 1.0) * value.item() for name, value in terms.items()))
    assert terms["cls"].item() == pytest.approx(F.cross_entropy(inputs["image_logits"], inputs["labels"]).item())
    assert terms["scatter"].item() == pytest.approx(inputs["anomalous_distances"][1, 0].item())
    normal_patches = torch.ones(2, 4, dtype=torch.bool)
    normal_patches[1, 0] = False
    assert terms["gather"].item() == pytest.approx(inputs["normal_distances"][normal_patches].mean().item())
    assert all(value.item() > 0 for value in terms.values())


def test_image_level_data_and_no_reconstruction_zero_their_terms() -> None:
    loss, terms = cops_objective(**objective_inputs(masks=None, use_recon_loss=False))
    assert [terms[name].item() for name in ("seg", "gather", "scatter", "recon")] == [0.0] * 4
    assert loss.item() == pytest.approx(terms["cls"].item() + terms["kl"].item())
