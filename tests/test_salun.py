"""SalUn (crce.methods.salun) against its naive reference (tests/reference_salun.py)."""

from __future__ import annotations

import pytest
import torch
from reference_salun import official_mask, train_salun

from crce.deltas import save_delta, unet_tensors
from crce.methods.salun import Salun, SalunSettings, saliency_mask
from crce.modeling import load_pipeline
from crce.references import ReferenceSet
from crce.training.engine import Engine


def image_sets(pipe):
    size = pipe.unet.config.sample_size
    gen = torch.Generator().manual_seed(4)
    forget = ReferenceSet(torch.randn((5, 4, size, size), generator=gen),
                          {"prompts": ["an image of a cat"], "images_per_prompt": 5})  # fmt: skip
    remain = ReferenceSet(torch.randn((6, 4, size, size), generator=gen),
                          {"prompts": ["an image of a dog", "an image of a fox"],
                           "images_per_prompt": 3, "extra": {"pseudo": "animal"}})  # fmt: skip
    return {"forget": forget, "remain": remain}


def salun_engine(tiny_model, cat_split, iterations=4, dtype=torch.float32):
    pipe = load_pipeline(tiny_model, dtype=dtype)
    references = image_sets(pipe)
    settings = {"strategy": "salun", "iterations": iterations, "batch_size": 2, "lr": 1e-3,
                "precision": "float32"}  # fmt: skip
    engine = Engine.from_settings(pipe, {"salun": settings}, target="cat", split=cat_split,
                                  seed=7, references=references)  # fmt: skip
    return engine, references


def naive_run(tiny_model, references, dtype, iterations=4):
    forget, remain = references["forget"], references["remain"]
    return train_salun(load_pipeline(tiny_model, dtype=dtype), forget.latents, forget.prompts,
                       remain.latents, remain.prompts, "an image of a animal", seed=7,
                       iterations=iterations, lr=1e-3, batch=2, alpha=0.5)  # fmt: skip


def test_mask_and_four_steps_match_the_naive_official_code(tiny_model, cat_split):
    """In fp64 (a mask is a threshold at the median |gradient|: fp32's batch-size rounding
    flips the entries next to it). Batches of 2 over 5 forget images: iteration 3 starts the
    second forget epoch (and restarts the remain order), the last forget batch holds one."""
    engine, references = salun_engine(tiny_model, cat_split, dtype=torch.float64)
    summary = engine.train(progress=False)["salun"]
    mask, naive, losses = naive_run(tiny_model, references, torch.float64)
    method = engine.methods["salun"]
    for name, kept in method.mask.items():
        assert torch.equal(kept, mask[name].bool()), name
    share = method.kept / sum(m.numel() for m in mask.values())
    assert abs(share - 0.5) < 1e-3
    assert [h["loss"] for h in summary["history"]] == pytest.approx(losses, rel=1e-9)
    trained = engine.tensors()["salun"]
    base = dict(load_pipeline(tiny_model, dtype=torch.float64).unet.named_parameters())
    moved = 0
    for name, tensor in naive.items():
        torch.testing.assert_close(trained[name].double(), tensor, atol=1e-9, rtol=1e-7)
        outside = ~mask[name].bool()
        assert torch.equal(tensor[outside], base[name].detach()[outside])  # masked out
        moved += int((tensor != base[name].detach()).sum())
    assert moved > 0


def test_the_loss_matches_the_naive_official_code_in_fp32(tiny_model, cat_split):
    engine, references = salun_engine(tiny_model, cat_split, iterations=1)
    loss = engine.train(progress=False)["salun"]["history"][0]["loss"]
    _, _, losses = naive_run(tiny_model, references, torch.float32, iterations=1)
    assert loss == pytest.approx(losses[0], rel=1e-5)


def test_the_mask_keeps_the_largest_half_of_a_hand_made_gradient():
    gradients = {"a": torch.tensor([[0.1, -5.0], [0.3, 2.0]]),
                 "b": torch.tensor([-0.2, 4.0, 0.05, -1.0, 0.7, 3.0])}  # fmt: skip
    ours = saliency_mask(gradients, 0.5)
    official = official_mask(gradients, 0.5)
    assert all(torch.equal(ours[k], official[k].bool()) for k in gradients)
    assert ours["a"].tolist() == [[False, True], [False, True]]
    assert ours["b"].tolist() == [False, True, False, True, False, True]


def test_the_mask_keeps_exactly_half_when_most_gradients_are_zero():
    """A UNet whose later layers get no gradient: the zeros tie at the threshold, and the
    mask still keeps share x N entries, the nonzero ones first, as the official ranks do."""
    gradients = {"a": torch.tensor([0.0, 3.0, 0.0, 0.0]), "b": torch.tensor([0.0, 0.0, 1.0, 0.0])}
    ours = saliency_mask(gradients, 0.5)
    official = official_mask(gradients, 0.5)
    assert sum(int(m.sum()) for m in ours.values()) == 4
    assert all(torch.equal(ours[k], official[k].bool()) for k in gradients)
    assert ours["a"][1] and ours["b"][2]


def test_the_sparse_delta_round_trips_into_the_unet(tiny_model, cat_split, tmp_path):
    engine, _ = salun_engine(tiny_model, cat_split, iterations=2)
    engine.train(progress=False)
    trained = engine.tensors()["salun"]
    delta = engine.deltas()["salun"]
    assert all(k.startswith("sparse.") for k in delta)
    dense_bytes = sum(t.numel() * 4 for t in trained.values())
    assert sum(t.numel() * t.element_size() for t in delta.values()) < 0.6 * dense_bytes
    path = tmp_path / "delta.safetensors"
    save_delta(delta, path, method="salun", concept="cat")
    from safetensors.torch import load_file

    pipe = load_pipeline(tiny_model)
    restored = unet_tensors(load_file(path), pipe.unet)
    base = dict(pipe.unet.named_parameters())
    assert 0 < len(restored) < len(trained)  # a tensor the mask leaves whole is not stored
    for name, tensor in trained.items():
        assert torch.equal(restored.get(name, base[name].detach()), tensor), name


def test_the_remain_images_are_the_train_retains_drawn_once_the_split_exists(tmp_path):
    anchors = tmp_path / "anchors.tsv"
    anchors.write_text("concept\tanchor\ncat\tanimal\n")
    settings = SalunSettings(strategy="salun", anchors=str(anchors), forget_images=12,
                             remain_images=3)  # fmt: skip
    forget, remain = Salun.references(settings, {"id": "cat", "text": "cat", "category": "object"})
    assert forget.prompts == ("an image of a cat",) and forget.images_per_prompt == 12
    assert remain.prompts == () and remain.from_split == "retain_train"
    assert remain.template == "an image of a {}" and remain.extra == {"pseudo": "animal"}
