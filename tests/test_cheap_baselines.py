"""ESD-u, SLD, RECE and SPEED (CA, SalUn, FMN: tests/test_ca.py, test_salun.py, test_fmn.py) against independent references that import nothing of them."""

import json

import numpy as np
import pytest
import torch

from crce.modeling import load_pipeline

torch.set_num_threads(2)


# -- ESD-u ----------------------------------------------------------------------------------
def official_esd_u(unet) -> list[str]:
    """The ESD code's esd-u, as esd_sd.py (rohitgandikota/erasing at 25613d2,
    get_esd_trainable_parameters) writes it: module by module, by class name."""
    names = []
    for name, module in unet.named_modules():
        if module.__class__.__name__ in ["Linear", "Conv2d", "LoRACompatibleLinear", "LoRACompatibleConv"]:  # fmt: skip
            if "attn2" not in name:
                for n, _ in module.named_parameters():
                    names.append(name + "." + n)
    return names


def sd14_unet():
    """SD v1.4's UNet shapes, on the meta device (no memory, no weights)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(sample_size=64, block_out_channels=(320, 640, 1280, 1280),
                                    layers_per_block=2, cross_attention_dim=768,
                                    attention_head_dim=8)  # fmt: skip


def test_esd_u_selects_exactly_the_official_set():
    from crce.modeling import select_parameters

    unet = sd14_unet()
    ours = select_parameters(unet, "noxattn")
    assert ours == official_esd_u(unet)
    # What that set is on SD v1.4: 218 Linear/Conv2d modules outside attn2, 388 tensors (218
    # weights, 170 biases: attn1's q/k/v have none); no norm, conv_in, time_embedding and
    # conv_out included.
    assert len(ours) == 388 and sum(n.endswith(".bias") for n in ours) == 170
    assert not any(".attn2." in n or "norm" in n for n in ours)
    for name in ("conv_in.weight", "time_embedding.linear_1.weight", "conv_out.bias",
                 "down_blocks.0.resnets.0.conv1.weight",
                 "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                 "up_blocks.1.attentions.2.proj_out.weight"):  # fmt: skip
        assert name in ours, name
    compvis = select_parameters(unet, "noxattn-compvis")
    assert len(compvis) == 598 and any("norm" in n for n in compvis)  # the original code's


# -- RECE -----------------------------------------------------------------------------------
def numpy_rece_round(edited, original, c0, lamb, guide, retain, lamb1, lamb2, scale):
    """One round, term by term as the official close_form_emb.py and uce.py write it."""
    mat1 = lamb * np.eye(c0.shape[1])
    mat2 = np.zeros((c0.shape[1], c0.shape[1]))
    for w_new, w_old in zip(edited, original, strict=True):
        mat1 += w_new.T @ w_new
        mat2 += w_new.T @ w_old
    derived = c0 @ (np.linalg.inv(mat1) @ mat2).T
    out = []
    for w in edited:
        a = lamb1 * w.copy()
        b = lamb1 * np.eye(w.shape[1])
        for c_adv, c_new in zip(derived, guide, strict=True):
            a += scale * np.outer(w @ c_new, c_adv)
            b += scale * np.outer(c_adv, c_adv)
        for c in retain:
            a += lamb2 * np.outer(w @ c, c)
            b += lamb2 * np.outer(c, c)
        out.append(a @ np.linalg.inv(b))
    return out, derived


def test_the_derived_embedding_satisfies_its_normal_equations():
    from crce.closed_form import regenerating_embedding

    rng = np.random.default_rng(0)
    edited = [rng.normal(size=(6, 5)) for _ in range(3)]
    original = [rng.normal(size=(6, 5)) for _ in range(3)]
    c0 = rng.normal(size=(4, 5))
    ours = regenerating_embedding([torch.tensor(w) for w in edited],
                                  [torch.tensor(w) for w in original], torch.tensor(c0), 0.1).numpy()  # fmt: skip
    # gradient of sum_l |W'_l c - W_l c0|^2 + lamb |c|^2 is zero at the solution
    for c, c_orig in zip(ours, c0, strict=True):
        grad = sum(wn.T @ (wn @ c - wo @ c_orig) for wn, wo in zip(edited, original, strict=True))
        assert np.abs(grad + 0.1 * c).max() < 1e-10


def test_rece_is_uce_then_its_rounds(tiny_model, cat_split):
    from crce.methods.rece import Rece, ReceSettings
    from crce.methods.uce import Uce, UceSettings, edited_names
    from crce.modeling import encode_prompts

    pipe = load_pipeline(tiny_model)
    original = {n: p.detach().double().numpy() for n, p in pipe.unet.named_parameters()}
    settings = ReceSettings(rounds=2, regular_scale=0.1)
    ours = Rece(settings, target="cat", split=cat_split, seed=0).solve(pipe)
    start = Uce(UceSettings(), target="cat", split=cat_split, seed=0).solve(pipe)
    names = edited_names(pipe.unet)
    rows = lambda t: encode_prompts(pipe, [t])[0].double().numpy()  # noqa: E731
    current = [start[n].double().numpy() for n in names]
    for _ in range(2):
        current, derived = numpy_rece_round(current, [original[n] for n in names], rows("cat"),
                                            0.1, rows(""), rows(" "), 0.1, 0.1, 1.0)  # fmt: skip
    for name, reference in zip(names, current, strict=True):
        got = ours[name].double().numpy()
        assert np.abs(got - reference).max() / np.abs(reference).max() < 1e-5, name
    # the rounds moved what UCE left: the derived embedding regenerates less after them
    assert any(not torch.equal(ours[n], start[n]) for n in names)


# -- SPEED ----------------------------------------------------------------------------------
def numpy_speed(w, targets, anchors, retain, invariant, threshold, alpha, lamb):
    """SPEED's solution as its train_erase_null.py writes it (no filtering, no augmentation)."""
    a = targets.T @ targets / len(targets)
    b = anchors.T @ targets / len(targets)
    cov = retain.T @ retain / len(retain)
    u, s, _ = np.linalg.svd(cov)
    null = u[:, s < threshold]
    p = null @ null.T
    m = np.linalg.inv(a @ p + alpha * np.eye(len(a)))
    k2 = invariant
    inner = np.linalg.inv(k2.T @ p @ m @ k2 + lamb * np.eye(k2.shape[1]))
    return w @ (b - a) @ p @ (np.eye(len(a)) - m @ k2 @ inner @ k2.T @ p) @ m, p


def test_speed_leaves_the_retains_and_the_invariants_where_they_were():
    from crce.closed_form import null_space_edit, null_space_projector

    rng = np.random.default_rng(1)
    d = 12
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
    retain = rng.normal(size=(40, 5)) @ basis[:, :5].T * 3  # the retains span 5 directions
    w = rng.normal(size=(8, d))
    targets, anchors = rng.normal(size=(1, d)), rng.normal(size=(1, d))
    invariant = rng.normal(size=(d, 2))
    t = lambda x: torch.tensor(x)  # noqa: E731
    projector = null_space_projector(t(retain), 0.1)
    delta = null_space_edit(t(w), t(targets), t(anchors), projector, t(invariant), 1.0, 0.0)
    reference, p = numpy_speed(w, targets, anchors, retain, invariant, 0.1, 1.0, 0.0)
    assert np.abs(projector.numpy() - p).max() < 1e-8
    assert np.abs(delta.numpy() - reference).max() < 1e-8
    assert np.abs(delta.numpy() @ retain.T).max() < 1e-8  # the retains' values do not move
    assert np.abs(delta.numpy() @ invariant).max() < 1e-8  # lamb 0: the constraint is exact
    assert np.abs(delta.numpy() @ targets.T).max() > 1e-3  # the target's value does
    soft = null_space_edit(t(w), t(targets), t(anchors), projector, t(invariant), 1.0, 0.5)
    assert np.abs(soft.numpy() @ invariant).max() > 1e-8  # lamb > 0: a soft constraint


def test_speed_on_the_tiny_model_is_deterministic_and_edits_only_values(tiny_model, cat_split):
    from crce.methods.speed import Speed, SpeedSettings

    pipe = load_pipeline(tiny_model)
    runs = [Speed(SpeedSettings(), target="cat", split=cat_split, seed=7).solve(pipe) for _ in "ab"]
    assert runs[0] and all(".attn2.to_v." in n for n in runs[0])
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])


# -- SLD ------------------------------------------------------------------------------------
def test_sld_images_are_stable_diffusion_pipeline_safes(tiny_model, cat_split, tmp_path):
    """The sampler with SLD draws what diffusers' StableDiffusionPipelineSafe draws for the
    same seeds, the target as its safety concept, the preset's arguments."""
    from diffusers import DDIMScheduler, StableDiffusionPipelineSafe
    from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig
    from PIL import Image

    from crce.methods.sld import Sld, SldSettings
    from crce.sample import plan_images, sample_images, set_scheduler

    pipe = load_pipeline(tiny_model)
    sampling = Sld.sampling(SldSettings(), None, {"id": "cat", "text": "cat"})
    safe = sampling.pipeline(pipe)
    set_scheduler(safe, "ddim")
    plan = plan_images(cat_split, method="sld", seed=0, images_per_prompt=1).iloc[:4]
    sample_images(safe, plan, tmp_path, steps=3, guidance=7.5, resolution=32, batch_size=4,
                  sampling=sampling, progress=False)  # fmt: skip
    direct = StableDiffusionPipelineSafe(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
        scheduler=DDIMScheduler.from_config(pipe.scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    direct.safety_concept = "cat"
    generators = [torch.Generator().manual_seed(int(s)) for s in plan["seed"]]
    images = direct(prompt=list(plan["prompt"]), num_inference_steps=3, guidance_scale=7.5,
                    height=32, width=32, generator=generators, output_type="np",
                    **SafetyConfig.MEDIUM).images  # fmt: skip
    for array, path in zip(images, plan["path"], strict=True):
        expected = (array * 255).round().astype("uint8")
        assert np.array_equal(np.asarray(Image.open(tmp_path / path)), expected), path


def test_an_sld_preset_that_does_not_exist_is_a_schema_error_naming_it():
    import yaml
    from helpers import REPO
    from snakemake.utils import validate

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["methods"]["sld"] = {"strategy": "sld", "preset": "EXTREME"}
    with pytest.raises(Exception, match="'EXTREME' is not one of"):
        validate(config, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))


@pytest.mark.slow
def test_the_cheap_baselines_have_their_rows_in_the_test_world(test_world, tmp_path):
    """config/baselines.yaml on the finished test world: only the new methods' jobs run (SLD
    has no erase job), each has its Table 1 row (SPM's sampled with its transport), SLD
    exports its safe pipeline and SPM's export says it holds no transport."""
    import pandas as pd
    import yaml
    from helpers import REPO, snakemake

    world = test_world.copy(tmp_path / "world")
    baselines = yaml.safe_load((REPO / "config" / "baselines.yaml").read_text())["methods"]
    cat = world.subset("cat")  # their jobs on the one concept the assertions read
    # CA's anchor images: one set per anchor (cat and bat (animal) share "animal"'s); SalUn's
    # forget and remain images: two per concept; FMN's images of the target: one per concept
    assert world.plan("models", methods=baselines)["reference_images"] == 3 + 2 * 4 + 4
    plan = world.plan("table1", sheet=cat, methods=baselines)
    assert plan["erase"] == 7 and plan["sample"] == 8  # SLD samples, trains nothing
    assert plan["reference_images"] == 4
    exports = ["results/export/sld/cat", "results/export/spm/cat"]
    result = snakemake(world.work, "table1", *exports, *world.args(sheet=cat, methods=baselines))
    assert result.returncode == 0, result.stdout[-3000:]
    table = pd.read_csv(world.work / "results" / "table1.csv").set_index("method")
    for label in ("ESD-u", "SLD", "RECE", "SPEED", "SPM", "CA", "SalUn", "FMN"):
        assert table.loc[label].between(0, 100).all(), label
    assert not (world.work / "results" / "models" / "sld").exists()
    from diffusers import DiffusionPipeline

    exported = DiffusionPipeline.from_pretrained(world.work / "results" / "export" / "sld" / "cat")
    assert type(exported).__name__ == "StableDiffusionPipelineSafe"
    record = yaml.safe_load((world.work / "results/export/sld/cat/crce_export.json").read_text())
    assert record["safety_concept"] == "cat" and record["call_kwargs"]["sld_guidance_scale"] == 1000
    spm = world.work / "results" / "export" / "spm" / "cat"
    assert (spm / "CAVEAT.txt").read_text().startswith("no transport")
    sampled = json.loads((world.work / "results/images/spm/cat/sampling.json").read_text())
    assert sampled["sampling"]["settings"]["transport"] == "clipcos_tokenuni"
    train = json.loads((world.work / "results/models/spm/cat/train.json").read_text())
    assert train["iterations"] == 4  # train.max_iterations bounds SPM's official 3,000
    from crce.deltas import delta_record

    ca = delta_record(str(world.work / "results/models/ca/cat/delta.safetensors"))
    assert ca["anchor"] == "animal" and ca["prior_preservation"] is False
    assert ca["lr"] == pytest.approx(2e-6 * 2)  # --scale_lr: x the test world's batch of 2
    salun = world.work / "results/models/salun/cat/delta.safetensors"
    assert delta_record(str(salun))["pseudo"] == "animal"
    from safetensors import safe_open

    with safe_open(str(salun), "pt") as stored:
        assert all(k.startswith("sparse.") for k in stored.keys())  # by its mask
    remain = pd.read_parquet(next(
        m for m in (world.work / "results/references").glob("*/manifest.parquet")
        if pd.read_parquet(m)["prompt"].str.startswith("an image of a").all()
        and "an image of a cat" not in set(pd.read_parquet(m)["prompt"])))  # fmt: skip
    fmn = world.work / "results/models/fmn/cat/delta.safetensors"
    assert delta_record(str(fmn))["prompt"] == "a photo of <s1><s2><s3><s4>"  # its inversion
    with safe_open(str(fmn), "pt") as stored:
        assert "conv_out.weight" not in stored.keys()  # no gradient reaches it: not stored
    split = json.loads((world.work / "results/splits/cat.json").read_text())
    assert set(remain["prompt"]) == {f"an image of a {i['text']}" for i in split["retain_train"]}
