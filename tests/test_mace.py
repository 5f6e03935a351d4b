"""MACE (crce.methods.mace) against its naive reference (tests/reference_mace.py) and by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from reference_mace import cache, find_matching_indices
from reference_mace import mace as naive_mace

from crce import methods as registry
from crce.erase import Job
from crce.masks import segment_images
from crce.methods.mace import (
    aligned_positions,
    augmented_prompts,
    masked_attention,
    matching_indices,
    prompt_gram,
)
from crce.modeling import load_pipeline
from crce.references import ReferenceSet
from crce.settings import TrainRuntime
from crce.training import TrainingError

CATEGORY = {"concept_type": "object", "mapping": "ground", "lamb": 10.0, "lr": 1e-3,
            "train_preserve_scale": 0.0, "fuse_preserve_scale": 0.0, "preserve_weight": 0.0}  # fmt: skip


def settings_of(**category):
    cat = {**CATEGORY, **category}
    return {"strategy": "mace", "iterations": 3, "precision": "float32",
            "categories": {"object": cat, "celebrity": cat, "ip": cat}}  # fmt: skip


def instances(pipe, n=3, masked=True, seed=0):
    size = pipe.unet.config.sample_size
    latents = torch.randn((n, 4, size, size), generator=torch.Generator().manual_seed(seed))
    masks = None
    if masked:
        masks = torch.zeros((n, size * 8, size * 8), dtype=torch.uint8)
        masks[:, 4:20, 2:30] = 1
        masks[1] = 1  # one image masked whole
    return ReferenceSet(latents, {"prompts": ["a photo of the cat"], "images_per_prompt": n},
                        masks)  # fmt: skip


def run_ours(tiny_model, split, params, references, checkpoint_dir=None):
    pipe = load_pipeline(tiny_model)
    cls, settings = registry.parse(params)
    method = cls(settings, target="cat", split=split, seed=5)
    job = Job(pipe=pipe, concept={"id": "cat", "text": "cat", "category": "object"},
              split=split, seed=5, runtime=TrainRuntime(), checkpoint_dir=checkpoint_dir,
              device=torch.device("cpu"), references=references)  # fmt: skip
    delta, summary = cls.erase(job, {"mace": method})["mace"]
    return method, delta, summary


def test_token_alignment_matches_the_official_indices():
    cases = [
        ([49406, 1, 2, 3, 49407], [49406, 1, 9, 3, 49407]),
        ([49406, 1, 2, 2, 3, 49407], [49406, 1, 9, 3, 49407]),  # the old is longer
        ([49406, 5, 3, 49407], [49406, 5, 8, 8, 8, 3, 49407]),  # the new is longer
        ([49406, 7, 49407], [49406, 7, 49407]),  # equal
    ]
    for old, new in cases:
        assert matching_indices(old, new) == find_matching_indices(old, new)
        old_x, new_x = aligned_positions(old, new, 12)
        assert len(old_x) == len(new_x) and max(old_x + new_x) < 12
        assert old_x[-1] == 11 or new_x[-1] == 11  # the longer one keeps all its padding


@pytest.mark.parametrize(
    "category, masked, prior, squared",
    [
        ({}, True, False, False),
        (
            {
                "concept_type": "style",
                "mapping": "art",
                "lamb": 0.5,
                "train_preserve_scale": 0.5,
                "fuse_preserve_scale": 0.3,
            },
            False,
            True,
            False,
        ),  # fmt: skip
        (
            {
                "lamb": 2.0,
                "train_preserve_scale": 0.5,
                "fuse_preserve_scale": 0.3,
                "preserve_weight": 2.0,
            },
            True,
            True,
            True,
        ),  # fmt: skip
        (
            {
                "lamb": 2.0,
                "train_preserve_scale": 0.5,
                "fuse_preserve_scale": 0.3,
                "preserve_weight": 2.0,
                "domain_prompts": "domain.csv",
            },
            True,
            True,
            False,
        ),
    ],
)
def test_three_stages_match_the_naive_official_pipeline(tiny_model, cat_split, tmp_path,
                                                        monkeypatch, category, masked, prior,
                                                        squared):  # fmt: skip
    from safetensors.torch import save_file

    from crce.methods import mace

    monkeypatch.chdir(tmp_path)
    params = settings_of(**category)
    params["preserve_squared"] = squared
    domain_file = category.get("domain_prompts")
    if prior and not domain_file:
        params["domain"] = "retains"
    references = {"instances": instances(load_pipeline(tiny_model), masked=masked)}
    base = load_pipeline(tiny_model)
    coco = ["a dog on a sofa", "two birds in the sky", "a red bus on a street"]
    if prior:
        settings = registry.parse(params)[1]
        path = tmp_path / mace.prior_file(settings)
        path.parent.mkdir(parents=True)
        save_file({"gram": prompt_gram(base, coco)}, str(path))
    people = ["a photo of a singer", "a portrait of an actor"]
    if domain_file:
        (tmp_path / domain_file).write_text("prompt\n" + "\n".join(people) + "\n")
        save_file({"gram": prompt_gram(base, people)},
                  str(tmp_path / mace.caption_file(domain_file, None)))  # fmt: skip
    method, delta, summary = run_ours(tiny_model, cat_split, params, references)
    cat = {**CATEGORY, **category}
    news = augmented_prompts(cat["mapping"], cat["concept_type"], method.settings, 5)
    retains = [p for i in cat_split.retain_train
               for p in augmented_prompts(i.text, cat["concept_type"], method.settings, 5)]  # fmt: skip
    naive, losses = naive_mace(
        base, references["instances"].latents, references["instances"].masks if masked else None,
        method.olds, news, "cat", seed=5, steps=3, lr=cat["lr"], lamb=cat["lamb"],
        prior=cache(base, coco) if prior else None,
        domain=(cache(base, people) if domain_file else cache(base, retains)) if prior else None,
        train_scale=cat["train_preserve_scale"], fuse_scale=cat["fuse_preserve_scale"],
        weight=cat["preserve_weight"], squared=squared,
    )  # fmt: skip
    assert [h["loss"] for h in summary["history"]] == pytest.approx(losses, rel=1e-5)
    assert set(delta) == set(naive)
    original = dict(base.unet.named_parameters())
    for name, tensor in naive.items():
        torch.testing.assert_close(delta[name], tensor, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(tensor, original[name].detach())


def test_the_refinement_solve_matches_numpy(tiny_model, cat_split):
    """Stage 1 against numpy's inverse on the reference's contexts and values (fp64)."""
    from reference_mace import ca_layers, prepare_k_v

    from crce.methods.mace import edited_weights

    pipe = load_pipeline(tiny_model)
    cls, settings = registry.parse(settings_of(lamb=7.0))
    method = cls(settings, target="cat", split=cat_split, seed=5)
    method.category_settings = settings.category("object")
    base = {n: w.detach().double() for n, w in edited_weights(pipe.unet).items()}
    ours = method.refine(pipe, base, None)
    news = augmented_prompts("ground", "object", settings, 5)
    projections = ca_layers(pipe.unet)
    contexts, valuess = prepare_k_v(pipe, projections, method.olds, news)
    for k, (name, layer) in enumerate(projections):
        w = layer.weight.detach().double().numpy()
        pairs = zip(contexts, valuess, strict=True)
        mat1 = 7.0 * w + sum(v[k].detach().numpy().T @ c.numpy() for c, v in pairs)
        mat2 = 7.0 * np.eye(w.shape[1]) + sum(c.numpy().T @ c.numpy() for c in contexts)
        np.testing.assert_allclose(ours[name].numpy(), mat1 @ np.linalg.inv(mat2), rtol=1e-4,
                                   atol=1e-6)  # fmt: skip


def test_the_loss_reads_the_probabilities_inside_the_mask_at_the_concept_positions():
    probs = torch.arange(2 * 16 * 5, dtype=torch.float64).reshape(2, 16, 5)  # heads, 4x4, tokens
    positions = torch.tensor([False, True, False, True, False])
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:4, 4:] = True  # the top-right quarter of the image: queries (0..1, 2..3) of the 4x4
    kept = masked_attention(probs, positions, mask)
    queries = [2, 3, 6, 7]
    expected = probs[:, queries][:, :, [1, 3]]
    torch.testing.assert_close(kept, expected)
    assert kept.norm().item() == pytest.approx(float(np.sqrt((expected**2).sum())))
    torch.testing.assert_close(masked_attention(probs, positions, None), probs[..., [1, 3]])


def test_the_fusion_solves_its_normal_equations(tiny_model, cat_split):
    references = {"instances": instances(load_pipeline(tiny_model))}
    method, delta, _ = run_ours(tiny_model, cat_split, settings_of(lamb=3.0), references)
    pipe = load_pipeline(tiny_model)
    gram = prompt_gram(pipe, method.olds)
    from crce.methods.mace import edited_weights

    base = {n: w.detach().double() for n, w in edited_weights(pipe.unet).items()}
    name = next(iter(delta))
    refined = method.refine(pipe, base, None)[name].double()
    lora = method.processors[name.rsplit(".", 2)[0]].product(name.rsplit(".", 2)[1]).double()
    w = delta[name].double()
    # d/dW [3 |W - W'|^2 + sum |W c - (W' + dW) c|^2] = 0
    residual = 3.0 * (w - refined) + (w - refined - lora) @ gram
    assert residual.abs().max().item() < 1e-3 * (lora @ gram).abs().max().item()


def test_missing_masks_or_images_are_errors_naming_the_concept(tiny_model, cat_split):
    pipe = load_pipeline(tiny_model)
    with pytest.raises(TrainingError, match="cat: MACE's images of the concept have no masks"):
        run_ours(tiny_model, cat_split, settings_of(), {"instances": instances(pipe, masked=False)})
    with pytest.raises(TrainingError, match="cat: MACE's images of the concept were not given"):
        run_ours(tiny_model, cat_split, settings_of(), {})


def test_a_segmenter_that_finds_nothing_masks_the_image_whole(tmp_path):
    shape = np.full((16, 16, 3), 255, dtype=np.uint8)
    shape[4:8, 2:10] = (200, 30, 30)
    Image.fromarray(shape).save(tmp_path / "shape.png")
    Image.fromarray(np.full((16, 16, 3), 255, dtype=np.uint8)).save(tmp_path / "blank.png")
    spec = {"segmenter": "crce_worlds.toy.segment:Foreground", "label": "square", "threshold": 0.3}
    masks, whole = segment_images(spec, [str(tmp_path / "shape.png"), str(tmp_path / "blank.png")],
                                  "cpu")  # fmt: skip
    assert whole == 1
    assert masks.dtype == np.uint8 and masks.shape == (2, 16, 16)
    assert masks[0].sum() == 32 and masks[0][4:8, 2:10].all()
    assert masks[1].all()


@pytest.fixture(scope="module")
def tiny_gsam(tmp_path_factory):
    from crce_worlds.tiny import build_tiny_gsam

    folder = tmp_path_factory.mktemp("gsam")
    return tuple(str(p) for p in build_tiny_gsam(folder / "detector", folder / "sam"))


def random_image(seed=0, size=32):
    pixels = np.random.default_rng(seed).random((size, size, 3)) * 255
    return Image.fromarray(pixels.astype(np.uint8))


def test_grounded_sam_masks_as_the_official_route_with_the_concept_as_one_label(tiny_gsam):
    from reference_mace import grounded_segmentation

    from crce.masks_gsam import GroundedSam

    detector, sam = tiny_gsam
    ours = GroundedSam("cpu", detector, sam)
    heard = []
    tokenizer = ours.detection.tokenizer
    ours.detection.tokenizer = lambda text, **kw: heard.append(text) or tokenizer(text, **kw)
    images = [random_image(0), random_image(1)]
    masks = ours.masks(images, "bat", 0.3)
    assert heard == ["bat.", "bat."]  # one label per image, not one per character
    for image, mask in zip(images, masks, strict=True):
        official = grounded_segmentation(image, ["bat"], 0.3, detector, sam)
        assert official is not None and mask.shape == (32, 32) and mask.dtype == bool
        np.testing.assert_array_equal(mask, official)


def test_nothing_detected_masks_the_image_whole_and_is_counted(tiny_gsam, tmp_path):
    detector, sam = tiny_gsam
    paths = []
    for k in range(2):
        random_image(k).save(tmp_path / f"{k}.png")
        paths.append(str(tmp_path / f"{k}.png"))
    spec = {"segmenter": "gsam", "label": "cat", "threshold": 0.999999, "detector": detector,
            "sam": sam}  # fmt: skip
    masks, whole = segment_images(spec, paths, "cpu")
    assert whole == 2 and masks.shape == (2, 32, 32) and masks.all()
    masks, whole = segment_images({**spec, "threshold": 0.3}, paths, "cpu")
    assert whole == 0 and not masks.all()


def test_polygon_refinement_keeps_the_largest_outer_contour_filled():
    from crce.masks_gsam import polygon_refined

    mask = np.zeros((20, 20), dtype=bool)
    mask[2:12, 2:12] = True
    mask[5:8, 5:8] = False  # a hole
    mask[15:18, 15:18] = True  # a smaller blob
    refined = polygon_refined(mask)
    assert refined[2:12, 2:12].all() and refined.sum() == 100
    assert polygon_refined(np.zeros((4, 4), dtype=bool)) is None


def test_mask_models_that_cannot_be_loaded_are_named(tmp_path):
    from crce.masks_gsam import GroundedSam, MaskModelError

    with pytest.raises(MaskModelError, match="detector '.*nowhere-dino'.*SAM '.*nowhere-sam'"):
        GroundedSam("cpu", str(tmp_path / "nowhere-dino"), str(tmp_path / "nowhere-sam"))
    Image.fromarray(np.full((8, 8, 3), 255, dtype=np.uint8)).save(tmp_path / "a.png")
    spec = {"segmenter": "gsam", "label": "cat", "threshold": 0.3,
            "detector": str(tmp_path / "nowhere-dino"), "sam": str(tmp_path / "nowhere-sam")}  # fmt: skip
    with pytest.raises(MaskModelError, match="masks of 'cat': cannot load the mask models"):
        segment_images(spec, [str(tmp_path / "a.png")], "cpu")


@pytest.mark.slow
def test_a_mace_model_exports_to_a_pipeline_diffusers_loads(test_world, tmp_path):
    from diffusers import StableDiffusionPipeline
    from helpers import snakemake
    from safetensors.torch import load_file

    world = test_world.copy(tmp_path / "world")
    result = snakemake(world.work, "results/export/mace/cat", *world.args())
    assert result.returncode == 0, result.stdout[-3000:]
    exported = StableDiffusionPipeline.from_pretrained(world.work / "results/export/mace/cat")
    delta = load_file(world.work / "results/models/mace/cat/delta.safetensors")
    weights = dict(exported.unet.named_parameters())
    for name, tensor in delta.items():
        torch.testing.assert_close(weights[name].detach(), tensor)


@pytest.mark.slow
def test_mace_trains_in_the_test_world_on_its_masked_images_and_prior_cache(test_world):
    """The shared test world's MACE row is this pipeline's: each concept's delta holds the
    fused attn2 K/V weights; objects and celebrities trained inside masks from the tiny
    GroundingDINO + SAM the workflow built, IP as a style without; one prior cache."""
    import json

    from safetensors import safe_open

    from crce.deltas import delta_record
    from crce.methods.uce import edited_names

    work = test_world.work
    table = __import__("pandas").read_csv(work / "results" / "table1.csv")
    assert "MACE" in set(table["method"])
    names = set(edited_names(load_pipeline(str(work / "results" / "base-model" / "tiny")).unet))
    masked = {}
    for concept in ("cat", "bat-animal", "harry-potter", "beyonce"):
        delta = work / "results" / "models" / "mace" / concept / "delta.safetensors"
        with safe_open(str(delta), "pt") as handle:
            assert set(handle.keys()) == names
        masked[concept] = delta_record(delta)["masked"]
    assert masked == {"cat": True, "bat-animal": True, "harry-potter": False, "beyonce": True}
    sets = {}
    for path in (work / "results" / "references").glob("*/latents.safetensors"):
        with safe_open(str(path), "pt") as handle:
            params = json.loads(handle.metadata()["params"])
            if params.get("masks"):
                sets[params["prompts"][0]] = (handle.get_tensor("masks"), params["masks"])
    masks, spec = sets["a photo of the cat"]
    assert masks.shape == (2, 32, 32) and masks.max() == 1
    assert spec["segmenter"] == "gsam" and spec["label"] == "cat"
    assert (work / "results" / "base-model" / "tiny-sam" / "config.json").exists()
    caches = sorted((work / "results" / "mace").glob("cache-*.safetensors"))
    assert len(caches) == 2  # the prior's (the COCO stand-in) and the celebrities' domain
    for cache_path in caches:
        with safe_open(str(cache_path), "pt") as handle:
            gram = handle.get_tensor("gram")
        torch.testing.assert_close(gram, gram.T)
