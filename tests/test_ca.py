"""Concept Ablation (crce.methods.ca) against its naive reference (tests/reference_ca.py)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from reference_ca import train_ca

from crce.methods.ca import AnchorError, CaSettings, ConceptAblation, anchor_for, overlaps
from crce.modeling import load_pipeline
from crce.references import ReferenceSet
from crce.training import TrainingError
from crce.training.engine import Engine

PROMPTS = ["a photo of a animal", "a animal in a garden", "a drawing of a animal"]


def anchor_set(pipe, per_prompt=2, anchor="animal", seed=0):
    size = pipe.unet.config.sample_size
    latents = torch.randn((len(PROMPTS) * per_prompt, 4, size, size),
                          generator=torch.Generator().manual_seed(seed))  # fmt: skip
    params = {"prompts": [p.replace("animal", anchor) for p in PROMPTS],
              "images_per_prompt": per_prompt, "extra": {"anchor": anchor}}  # fmt: skip
    return ReferenceSet(latents, params)


@pytest.mark.parametrize(
    ("target", "settings"),
    [
        ("cat", {}),  # model-based, no prior preservation (the anchor is not in the target)
        ("grumpy animal", {}),  # auto: the anchor's text is in the target's -> prior on
        ("cat", {"loss": "noise-based", "hflip": False}),
    ],
)
def test_three_steps_match_the_naive_official_loop(tiny_model, cat_split, target, settings):
    pipe = load_pipeline(tiny_model)
    references = {"anchor": anchor_set(pipe)}
    params = {"strategy": "ca", "iterations": 3, "batch_size": 4, "lr": 1e-3,
              "precision": "float32", **settings}  # fmt: skip
    engine = Engine.from_settings(pipe, {"ca": params}, target=target, split=cat_split,
                                  seed=11, references=references)  # fmt: skip
    method = engine.methods["ca"]
    assert method.prior == (target == "grumpy animal")
    engine.train(progress=False)
    trained = engine.tensors()["ca"]

    naive = train_ca(load_pipeline(tiny_model), references["anchor"].latents,
                     references["anchor"].prompts, "animal", target, seed=11, iterations=3,
                     lr=1e-3, batch=4, prior=method.prior,
                     model_based=settings.get("loss", "model-based") == "model-based",
                     hflip=settings.get("hflip", True))  # fmt: skip
    assert set(trained) == set(naive) and trained
    base = dict(load_pipeline(tiny_model).unet.named_parameters())
    for name, tensor in naive.items():
        assert not torch.equal(tensor, base[name].detach())  # it trained
        torch.testing.assert_close(trained[name], tensor, atol=1e-5, rtol=1e-5)


def test_the_batch_walks_the_dataset_like_a_shuffling_data_loader(tiny_model, cat_split):
    """Each epoch holds every item once (6 items, batches of 4: epochs straddle batches)."""
    pipe = load_pipeline(tiny_model)
    engine = Engine.from_settings(pipe, {"ca": {"strategy": "ca", "batch_size": 4,
                                                "precision": "float32"}},
                                  target="cat", split=cat_split, seed=3,
                                  references={"anchor": anchor_set(pipe)})  # fmt: skip
    walk = [i for k in range(6) for i in engine.objective.items(k, 4)]
    for epoch in range(4):
        assert sorted(walk[epoch * 6 : (epoch + 1) * 6]) == list(range(6))
    assert walk[:6] != walk[6:12]  # a fresh shuffle each epoch


def test_an_anchor_that_is_a_coref_is_refused_naming_the_concept(tiny_model, cat_split):
    pipe = load_pipeline(tiny_model)
    references = {"anchor": anchor_set(pipe, anchor="kitty number 3")}
    with pytest.raises(
        TrainingError, match=r"cat: its anchor 'kitty number 3' is one of its corefs"
    ):
        Engine.from_settings(pipe, {"ca": {"strategy": "ca", "precision": "float32"}},
                             target="cat", split=cat_split, seed=0, references=references)  # fmt: skip


def test_a_job_without_the_anchor_images_says_so_naming_the_concept(tiny_model, cat_split):
    with pytest.raises(TrainingError, match=r"cat: CA's anchor images were not given"):
        Engine.from_settings(load_pipeline(tiny_model),
                             {"ca": {"strategy": "ca", "precision": "float32"}},
                             target="cat", split=cat_split, seed=0, references={})  # fmt: skip


def test_a_caption_without_the_anchor_is_refused_naming_it():
    with pytest.raises(ValidationError, match=r"lack it: \['a photo'\]"):
        CaSettings(strategy="ca", anchor_prompts=("a photo of a {anchor}", "a photo"))


@pytest.mark.parametrize(
    ("anchor", "target", "expected"),
    [("cat", "Grumpy Cat", True), ("man", "Batman", False), ("man", "Iron Man", True),
     ("dog", "hotdog stand", False), ("golden retriever", "a golden retriever puppy", True)],
)  # fmt: skip
def test_prior_preservation_follows_whole_words(anchor, target, expected):
    assert overlaps(anchor, target) is expected


def test_concepts_with_one_anchor_share_one_image_set(tmp_path):
    anchors = tmp_path / "anchors.tsv"
    anchors.write_text("concept\tanchor\ncat\tanimal\ndog\tanimal\nGrumpy Cat\tcat\n")
    settings = CaSettings(strategy="ca", anchors=str(anchors), anchor_images=25)
    cat, dog, grumpy = (
        ConceptAblation.references(settings, {"id": i, "text": t, "category": "object"})
        for i, t in [("cat", "cat"), ("dog", "dog"), ("grumpy-cat", "Grumpy Cat")]
    )
    assert cat == dog and cat != grumpy
    (request,) = cat
    assert request.extra == {"anchor": "animal"} and request.scheduler == "dpmsolver"
    assert all("animal" in p for p in request.prompts)
    assert request.images_per_prompt * len(request.prompts) >= 25  # 10 captions x 3
    assert (request.steps, request.guidance) == (25, 6.0)  # train.py's class images


@pytest.mark.parametrize(
    ("rows", "error"),
    [
        ("concept\tanchor\ndog\tanimal\n", r"'cat' has no anchor in .*anchors.tsv"),
        ("concept\tanchor\ncat\tanimal\ncat\tpet\n", r"line 3: 'cat' is listed twice"),
        ("concept\tanchor\ncat\tCat\n", r"line 2: 'cat' is its own anchor"),
        ("concept\tanchor\ncat\t\n", r"line 2: a concept and its anchor"),
        ("concept\tcategory\ncat\tanimal\n", r"needs the columns concept and anchor"),
    ],
)
def test_a_bad_anchors_file_names_the_row_or_the_concept(tmp_path, rows, error):
    anchors = tmp_path / "anchors.tsv"
    anchors.write_text(rows)
    with pytest.raises(AnchorError, match=error):
        anchor_for(str(anchors), {"id": "cat", "text": "cat"})


def test_every_concept_of_the_paper_and_the_worlds_has_an_anchor():
    from crce.concepts import load_sheet

    for sheet, anchors in [("resources/concepts.tsv", "resources/anchors.tsv"),
                           ("resources/toy/concepts.tsv", "resources/toy/anchors.tsv"),
                           ("tests/data/concepts.tsv", "tests/data/anchors.tsv")]:  # fmt: skip
        for concept in load_sheet(sheet):
            anchor = anchor_for(anchors, {"id": concept.id, "text": concept.text})
            assert anchor.casefold() != concept.text.casefold()


@pytest.mark.slow
def test_an_llm_anchor_trains_ca_and_a_concept_without_one_fails_alone(test_world, tmp_path):
    """`anchors: llm`: the `anchor` job asks the (fake) LLM, CA trains on the LLM's anchor and
    captions; a concept the LLM gives no usable anchor for after its re-asks fails its own
    job with an error naming it, and the other concept's model is made (--keep-going)."""
    import json
    import os

    import pandas as pd
    from helpers import snakemake

    from crce.deltas import delta_record

    world = test_world.copy(tmp_path / "world")
    sheet = world.subset("cat", "Beyoncé")
    methods = {"ca": {"strategy": "ca", "label": "CA", "anchors": "llm", "anchor_captions": 3}}
    plan = world.plan("models", sheet=sheet, methods=methods)
    assert (plan["anchor"], plan["reference_images"], plan["erase"]) == (2, 2, 2)
    env = {**os.environ, "FAKE_BAD_ANCHOR": "Beyoncé"}
    result = snakemake(world.work, "--keep-going", "models",
                       *world.args(sheet=sheet, methods=methods), env=env)  # fmt: skip
    assert result.returncode != 0
    failed = (world.work / "logs/anchors/beyonce.log").read_text()
    assert "concept 'Beyoncé' (beyonce) anchor: no valid answer after" in failed
    assert "is the target 'Beyoncé' itself" in failed
    assert not (world.work / "results/models/ca/beyonce").exists()
    found = json.loads((world.work / "results/anchors/cat.json").read_text())
    assert found["anchor"] == "animal" and found["provenance"]["source"] == "llm"
    record = delta_record(str(world.work / "results/models/ca/cat/delta.safetensors"))
    assert record["anchor"] == "animal"
    drawn = [
        pd.read_parquet(m) for m in (world.work / "results/references").glob("*/manifest.parquet")
    ]
    assert any(set(d["prompt"]) == set(found["captions"]) for d in drawn)  # the LLM's captions
