"""Forget-Me-Not (crce.methods.fmn) against its naive reference (tests/reference_fmn.py)."""

from __future__ import annotations

import pytest
import torch
from reference_fmn import forget, invert

from crce.methods.fmn import FmnSettings, ForgetMeNot, concept_positions
from crce.methods.fmn import invert as ours_invert
from crce.modeling import load_pipeline
from crce.references import ReferenceSet
from crce.training import TrainingError
from crce.training.engine import Engine


def instances(pipe, n=3, seed=0):
    size = pipe.unet.config.sample_size
    latents = torch.randn((n, 4, size, size), generator=torch.Generator().manual_seed(seed))
    return ReferenceSet(latents, {"prompts": ["a photo of cat"], "images_per_prompt": n})


def fmn_engine(tiny_model, split, **settings):
    pipe = load_pipeline(tiny_model)
    references = {"instances": instances(pipe)}
    params = {"strategy": "fmn", "iterations": 3, "ti_iterations": 3, "lr": 1e-3,
              "precision": "float32", **settings}  # fmt: skip
    engine = Engine.from_settings(pipe, {"fmn": params}, target="cat", split=split, seed=5,
                                  references=references)  # fmt: skip
    return engine, references["instances"].latents


def test_textual_inversion_matches_the_official_table_resize_in_fp32(tiny_model):
    pipe = load_pipeline(tiny_model)
    latents = instances(pipe).latents
    settings = FmnSettings(strategy="fmn", ti_iterations=3)
    table = pipe.text_encoder.get_input_embeddings()
    before = table.weight.detach().clone()
    ours = ours_invert(pipe, latents, "cat", settings, seed=5)
    *_, naive = invert(load_pipeline(tiny_model), latents, "cat", seed=5, steps=3)
    start = pipe.text_encoder.get_input_embeddings().weight[
        pipe.tokenizer("cat", add_special_tokens=False).input_ids[0]
    ]
    assert not torch.allclose(naive[0], start)  # it trained
    torch.testing.assert_close(ours, naive, atol=1e-5, rtol=1e-5)
    # the pipe's encoder reads its own table again, unchanged; its tokenizer knows no <s1>
    assert pipe.text_encoder.get_input_embeddings() is table
    assert torch.equal(table.weight, before)
    assert "<s1>" not in pipe.tokenizer.get_vocab()


@pytest.mark.parametrize("use_ti", [True, False])
def test_three_steps_match_the_naive_official_loop_in_fp32(tiny_model, cat_split, use_ti):
    engine, latents = fmn_engine(tiny_model, cat_split, use_ti=use_ti)
    history = engine.train(progress=False)["fmn"]["history"]
    trained = engine.tensors()["fmn"]
    pipe = load_pipeline(tiny_model)
    if use_ti:
        tokenizer, encoder, _ = invert(pipe, latents, "cat", seed=5, steps=3)
        snippet = "<s1><s2><s3><s4>"
    else:
        tokenizer, encoder, snippet = None, None, "cat"
    naive, losses = forget(pipe, latents, f"a photo of {snippet}", snippet, seed=5, steps=3,
                           lr=1e-3, tokenizer=tokenizer, encoder=encoder)  # fmt: skip
    assert [h["loss"] for h in history] == pytest.approx(losses, rel=1e-5)
    assert set(trained) == set(naive)
    base = dict(load_pipeline(tiny_model).unet.named_parameters())
    moved = 0
    for name, tensor in naive.items():
        torch.testing.assert_close(trained[name], tensor, atol=1e-5, rtol=1e-5)
        moved += not torch.equal(tensor, base[name].detach())
    assert moved > 0


def test_gradient_checkpointing_trains_the_same_tensors(tiny_model, cat_split):
    from crce.settings import TrainRuntime

    plain, _ = fmn_engine(tiny_model, cat_split, use_ti=False)
    plain.train(progress=False)
    pipe = load_pipeline(tiny_model)
    checkpointed = Engine.from_settings(
        pipe, {"fmn": {"strategy": "fmn", "iterations": 3, "lr": 1e-3, "use_ti": False,
                       "precision": "float32"}}, target="cat", split=cat_split, seed=5,
        references={"instances": instances(pipe)},
        runtime=TrainRuntime(gradient_checkpointing=True))  # fmt: skip
    checkpointed.train(progress=False)
    ours, theirs = plain.tensors()["fmn"], checkpointed.tensors()["fmn"]
    assert all(torch.allclose(ours[n], theirs[n], atol=1e-6) for n in ours)


def test_the_positions_are_the_concept_tokens_and_every_end_token(tiny_model):
    pipe = load_pipeline(tiny_model)
    tokenizer = pipe.tokenizer
    ids = tokenizer("a cat", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    cat = tokenizer("cat", add_special_tokens=False).input_ids
    end = tokenizer.eos_token_id
    with_pooler = concept_positions(tokenizer, "a cat", "cat", True).tolist()
    assert with_pooler == [t in cat or t == end for t in ids]  # SD v1.4's padding is the end token
    alone = concept_positions(tokenizer, "a cat", "cat", False).tolist()
    assert alone == [t in cat for t in ids] and sum(alone) == len(cat)


def test_the_delta_keeps_only_the_tensors_the_steps_changed(tiny_model, cat_split):
    engine, _ = fmn_engine(tiny_model, cat_split, use_ti=False)
    engine.train(progress=False)
    trained, delta = engine.tensors()["fmn"], engine.deltas()["fmn"]
    base = dict(load_pipeline(tiny_model).unet.named_parameters())
    unchanged = {n for n, t in trained.items() if torch.equal(t, base[n].detach())}
    assert unchanged and set(delta) == set(trained) - unchanged
    assert "conv_out.weight" in unchanged  # past the last attn2: no gradient reaches it


def test_a_resumed_job_reads_its_inversion_instead_of_repeating_it(tiny_model, cat_split,
                                                                   tmp_path, monkeypatch):  # fmt: skip
    from crce import erase
    from crce.methods import fmn as module
    from crce.settings import TrainRuntime

    pipe = load_pipeline(tiny_model)
    refs = {"instances": instances(pipe)}
    settings = FmnSettings(strategy="fmn", iterations=2, ti_iterations=2, precision="float32")

    def job():
        method = ForgetMeNot(settings, target="cat", split=cat_split, seed=5)
        return erase.Job(load_pipeline(tiny_model), {"id": "cat", "text": "cat"}, cat_split, 5,
                         TrainRuntime(), tmp_path, torch.device("cpu"), refs), method  # fmt: skip

    first, method = job()
    ((tensors, _),) = ForgetMeNot.erase(first, {"fmn": method}).values()
    assert (tmp_path / "ti.safetensors").exists()
    monkeypatch.setattr(module, "invert", lambda *a, **k: pytest.fail("inverted again"))
    (tmp_path / "checkpoint.pt").unlink()  # the UNet stage starts over, the inversion not
    second, method = job()
    ((again, _),) = ForgetMeNot.erase(second, {"fmn": method}).values()
    assert all(torch.equal(again[n], t) for n, t in tensors.items())


def test_a_job_without_the_target_images_says_so_naming_the_concept(tiny_model, cat_split):
    with pytest.raises(TrainingError, match=r"cat: FMN's images of the target were not given"):
        Engine.from_settings(load_pipeline(tiny_model),
                             {"fmn": {"strategy": "fmn", "precision": "float32"}},
                             target="cat", split=cat_split, seed=0, references={})  # fmt: skip


def test_a_prompt_that_truncates_the_concept_away_is_refused_naming_it(tiny_model, cat_split):
    long = "a " * 20 + "{}"
    with pytest.raises(TrainingError, match=r"cat: none of its tokens is in .* after truncation"):
        fmn_engine(tiny_model, cat_split, use_ti=False, use_pooler=False, prompt=long)
