"""The image sets methods train on (crce.references, rule `reference_images`): keyed by what
decides their images, drawn once however many ask, deterministic, their latents the VAE's
encoding of the saved images; a method of your own file gets its set through the workflow."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from contract_methods import DenoiseReference

from crce.methods import ReferenceRequest
from crce.references import reference_key, request_params
from crce.sample import run_references
from crce.settings import SampleSettings
from crce.study import SettingsError, Study

SAMPLE = SampleSettings(resolution=32, precision="float32")
CAT = {"id": "cat", "text": "cat", "category": "object"}


def key(request, model="m"):
    return reference_key(request_params(request, model=model, sample=SAMPLE, concept_id="cat"))


def test_equal_requests_share_one_key_and_any_difference_is_another():
    base = ReferenceRequest("anchor", ("a cat",), images_per_prompt=4)
    assert key(base) == key(ReferenceRequest("another name", ("a cat",), images_per_prompt=4))
    assert key(base) == key(ReferenceRequest("anchor", ("a cat",), 4, resolution=32))  # the study's
    changed = [
        ReferenceRequest("anchor", ("a dog",), 4),
        ReferenceRequest("anchor", ("a cat",), 5),
        ReferenceRequest("anchor", ("a cat",), 4, steps=30),
        ReferenceRequest("anchor", ("a cat",), 4, resolution=64),
        ReferenceRequest("anchor", ("a cat",), 4, seed=1),
        ReferenceRequest("anchor", ("a cat",), 4, scheduler="ddim"),
        ReferenceRequest("anchor", ("a cat",), 4, extra={"mask": "sam"}),
    ]
    keys = {key(r) for r in changed} | {key(base, model="other")}
    assert len(keys) == len(changed) + 1 and key(base) not in keys


def study(methods: dict) -> Study:
    import yaml
    from helpers import REPO

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["methods"] |= methods  # beside the paper's (MACE's dropped: it asks for images)
    config["methods"].pop("mace")
    return Study(config)


def test_two_methods_asking_for_one_set_get_one_job_and_a_clash_is_refused(monkeypatch):
    def denoise(lr, name="DenoiseReference"):
        return {"strategy": f"contract_methods:{name}", "lr": lr, "iterations": 2}

    both = study({"a": denoise(1e-3), "b": denoise(1e-4)})
    assert len(both.reference_requests([CAT, {**CAT, "id": "dog", "text": "dog"}])) == 2
    sets = both.reference_sets(["a", "b"], CAT)
    assert list(sets) == ["anchor"] and len(both.reference_requests([CAT])) == 1
    params = both.reference_requests([CAT])[sets["anchor"]]
    assert params["prompts"] == ["a photo of cat"] and params["resolution"] == 512

    class OtherAnchor(DenoiseReference):
        @classmethod
        def references(cls, settings, concept):
            return [ReferenceRequest("anchor", ("a photo of a dog",), images_per_prompt=2)]

    import contract_methods

    monkeypatch.setattr(contract_methods, "OtherAnchor", OtherAnchor, raising=False)
    clash = study({"a": denoise(1e-3), "b": denoise(1e-3, "OtherAnchor")})
    with pytest.raises(SettingsError, match="two different image sets named 'anchor'"):
        clash.reference_sets(["a", "b"], CAT)


def test_a_set_is_deterministic_and_its_latents_encode_its_images(tiny_model, tmp_path):
    from diffusers import AutoencoderKL
    from PIL import Image
    from safetensors.torch import load_file

    request = ReferenceRequest("anchor", ("a photo of cat", "a cat"), images_per_prompt=3, steps=2)
    params = request_params(request, model=tiny_model, sample=SAMPLE, concept_id="cat")
    drawn = []
    for name in ("first", "second"):
        folder = tmp_path / name
        folder.mkdir()
        run_references(params=params, runtime={"device": "cpu", "batch_size": 4},
            manifest=str(folder / "manifest.parquet"), latents=str(folder / "latents.safetensors"))  # fmt: skip
        manifest = pd.read_parquet(folder / "manifest.parquet")
        drawn.append((manifest, load_file(folder / "latents.safetensors")["latents"]))
    (first, latents), (second, again) = drawn
    assert list(first["image_sha256"]) == list(second["image_sha256"]) and torch.equal(
        latents, again
    )
    assert len(first) == 6 and first["prompt"].tolist()[:3] == ["a photo of cat"] * 3
    assert first["seed"].nunique() == 6  # one noise per image
    # A second opinion on the encoding: the posterior of each image computed here, the stored
    # latent read as one draw from it (standardised residuals ~ N(0, 1)).
    vae = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae")
    pixels = torch.stack([
        torch.tensor(np.array(Image.open(p).convert("RGB")), dtype=torch.float32)
        .permute(2, 0, 1) / 127.5 - 1 for p in first["path"]
    ])  # fmt: skip
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
    assert latents.shape == posterior.mean.shape
    z = (latents / vae.config.scaling_factor - posterior.mean) / posterior.std
    assert abs(float(z.mean())) < 0.25 and 0.75 < float(z.std()) < 1.25


@pytest.mark.slow
def test_a_method_gets_its_set_through_the_workflow_drawn_once(test_world, tmp_path):
    """Two methods of a file of your own asking for the same set: one reference_images job,
    both train on its latents; nothing reruns after."""
    from helpers import snakemake

    world = test_world.copy(tmp_path / "world")
    strategy = "tests.contract_methods:DenoiseReference"
    methods = {
        "denoise": {"strategy": strategy, "label": "Denoise"},
        "denoise-fast": {"strategy": strategy, "label": "Denoise fast", "lr": 1e-2},
    }
    cat = world.subset("cat")
    plan = world.plan("models", sheet=cat, methods=methods)
    assert plan["reference_images"] == 1 and plan["erase"] == 2
    sets = world.work / "results" / "references"
    before = set(sets.iterdir())  # MACE's, drawn by the test world
    result = snakemake(world.work, "models", *world.args(sheet=cat, methods=methods))
    assert result.returncode == 0, result.stdout[-3000:]
    (folder,) = set(sets.iterdir()) - before
    manifest = pd.read_parquet(folder / "manifest.parquet")
    assert manifest["prompt"].tolist() == ["a photo of cat"] * 2
    for method in methods:
        record = json.loads((world.work / f"results/models/{method}/cat/train.json").read_text())
        assert record["iterations"] == 4 and record["loss"]["last"] > 0
    assert world.plan("models", sheet=cat, methods=methods) == {}


def test_a_damaged_set_names_its_file_and_how_to_rebuild_it(tmp_path):
    from crce.files import DamagedFileError
    from crce.references import load_references

    path = tmp_path / "latents.safetensors"
    path.write_bytes(b"\x00" * 20)
    with pytest.raises(DamagedFileError, match=rf"{path} is damaged.*--forcerun {path}"):
        load_references({"anchor": str(path)})
