"""SPM (crce.methods.spm) against naive references written here: the adapter's forward and
merge, the latent anchors, one training iteration's loss, the matching score by hand, and the
transport at sampling against the merged export."""

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from crce.deltas import save_delta
from crce.methods.spm import (
    Adapter,
    Spm,
    SpmSettings,
    content_tokens,
    draw_anchors,
    matching_scores,
)
from crce.modeling import encode_prompts, load_pipeline
from crce.sample import load_erased_pipeline, plan_images, sample_images
from crce.training.engine import Engine

torch.set_num_threads(2)


class Transformer2DModel(torch.nn.Module):  # the class name SPM's adapter looks for
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(6, 5)
        self.conv = torch.nn.Conv2d(4, 3, 3, padding=1)


class Host(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Transformer2DModel()
        self.outside = torch.nn.Linear(5, 5)  # not in a transformer: not adapted


def randomised(adapter, scale=0.3):
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapter.factors.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def test_the_adapter_adds_a_scaled_rank_r_residual_and_merges_to_the_same_weights():
    torch.manual_seed(0)
    host = Host()
    adapter = Adapter(host, rank=1, alpha=2.0)
    assert set(adapter.modules) == {"block.proj", "block.conv"}
    assert all(torch.equal(p.weight, torch.zeros_like(p.weight))
               for p in (pair.up for pair in adapter.factors.values()))  # fmt: skip
    randomised(adapter)
    x, image = torch.randn(3, 6), torch.randn(2, 4, 5, 5)
    base_linear, base_conv = host.block.proj(x), host.block.conv(image)
    factors = adapter.state_dict()
    d, u = factors["block.proj.down"], factors["block.proj.up"]
    naive_linear = base_linear + 2.0 * (x @ d.T @ u.T)  # scale alpha / rank = 2
    dc, uc = factors["block.conv.down"], factors["block.conv.up"]
    naive_conv = base_conv + 2.0 * F.conv2d(F.conv2d(image, dc, padding=1), uc)
    adapter.attach()
    adapter.multiplier = 0.0
    assert torch.equal(host.block.proj(x), base_linear)
    adapter.multiplier = 1.0
    assert torch.allclose(host.block.proj(x), naive_linear, atol=1e-6)
    assert torch.allclose(host.block.conv(image), naive_conv, atol=1e-5)
    adapter.multiplier = torch.tensor([0.5, 1.0, 0.0])  # one per row
    rows = host.block.proj(x)
    assert torch.allclose(rows[0], base_linear[0] + 0.5 * (naive_linear[0] - base_linear[0]))
    assert torch.allclose(rows[1], naive_linear[1], atol=1e-6) and torch.equal(
        rows[2], base_linear[2]
    )
    merged = adapter.merged()
    adapter.detach()
    assert set(merged) == {"block.proj.weight", "block.conv.weight"}
    with torch.no_grad():
        host.block.proj.weight.copy_(merged["block.proj.weight"])
        host.block.conv.weight.copy_(merged["block.conv.weight"])
    assert torch.allclose(host.block.proj(x), naive_linear, atol=1e-5)
    assert torch.allclose(host.block.conv(image), naive_conv, atol=1e-5)


def naive_anchors(target, count, gen):
    out = []
    while len(out) < count:
        n = torch.randn(target.shape, generator=gen)
        n = n / torch.sqrt((n**2).sum())
        cos = (target * n).sum() / torch.sqrt((target**2).sum())
        if torch.rand((), generator=gen).item() < 1 - cos.item():
            out.append((0.8 + 0.4 * torch.rand((), generator=gen).item()) * n * target.norm())
    return torch.cat(out)


def test_latent_anchors_follow_the_official_rejection_sampler():
    target = torch.randn(1, 7, 4, generator=torch.Generator().manual_seed(1))
    anchors = draw_anchors(target, 5, torch.Generator().manual_seed(9))
    assert torch.allclose(anchors, naive_anchors(target, 5, torch.Generator().manual_seed(9)))
    ratios = anchors.flatten(1).norm(dim=1) / target.norm()
    assert ((ratios >= 0.8) & (ratios < 1.2)).all() and anchors.shape == (5, 7, 4)


def test_one_iteration_loss_against_a_naive_reference(tiny_model, cat_split):
    """The ESD-style erase term on x_t from an adapter-on DDIM rollout, plus la_strength times
    the anchors' MSE between the adapter on and off, recomputed step by step."""
    settings = {"strategy": "spm", "iterations": 2, "rollout_steps": 4, "la_strength": 10.0,
                "anchors": 2, "precision": "float32", "erase_guidance": 1.5}  # fmt: skip
    pipe = load_pipeline(tiny_model)
    engine = Engine.from_settings(pipe, {"spm": settings}, target="cat", split=cat_split, seed=5)
    method = engine.methods["spm"]
    randomised(method.adapter, 0.05)
    loss = engine.losses(0)["spm"].item()

    factors = method.adapter.state_dict()
    unet, scale = pipe.unet, 1.0

    def predict(latents, t, context, m):
        handles = []
        for name, module in method.adapter.modules.items():
            d, u = factors[f"{name}.down"], factors[f"{name}.up"]

            def hook(mod, inputs, output, d=d, u=u):
                x = inputs[0]
                if isinstance(mod, torch.nn.Conv2d):
                    r = F.conv2d(F.conv2d(x, d, stride=mod.stride, padding=mod.padding), u)
                else:
                    r = x @ d.T @ u.T
                return output + m * scale * r

            handles.append(module.register_forward_hook(hook))
        try:
            method.adapter.multiplier = 0.0  # the code under test adds nothing meanwhile
            return unet(latents, t, encoder_hidden_states=context).sample
        finally:
            for h in handles:
                h.remove()

    gen = torch.Generator().manual_seed(int(engine.generator(0).initial_seed()))
    index = int(torch.randint(1, 4, (1,), generator=gen))
    size = unet.config.sample_size
    h, w = (int(torch.randint(4, 8, (1,), generator=gen)) * size // 8 for _ in "hw")
    latents = torch.randn((1, 4, h, w), generator=gen)
    uncond, target = encode_prompts(pipe, [""]), encode_prompts(pipe, ["cat"])
    rollout = DDIMScheduler.from_config(pipe.scheduler.config)
    rollout.set_timesteps(4)
    with torch.no_grad():
        for t in rollout.timesteps[:index]:
            e_u, e_c = predict(latents, t, uncond, 1.0), predict(latents, t, target, 1.0)
            latents = rollout.step(e_u + 3.0 * (e_c - e_u), t, latents).prev_sample
        full = DDIMScheduler.from_config(pipe.scheduler.config)
        full.set_timesteps(1000)
        t = full.timesteps[int(index * 1000 / 4)]
        neutral, positive = predict(latents, t, uncond, 0.0), predict(latents, t, target, 0.0)
        erased = predict(latents, t, target, 1.0)
        anchors = naive_anchors(target, 2, gen)
        on = predict(latents.repeat(2, 1, 1, 1), t, anchors, 1.0)
        off = predict(latents.repeat(2, 1, 1, 1), t, anchors, 0.0)
    erase = ((erased - (neutral - 1.5 * (positive - neutral))) ** 2).mean()
    expected = erase + 10.0 * ((on - off) ** 2).mean()
    assert math.isclose(loss, expected.item(), rel_tol=1e-4), (loss, expected.item())


def test_the_learning_rate_follows_cosine_with_restarts():
    method = Spm(SpmSettings(strategy="spm", iterations=100, lr_warmup=10, lr_cycles=2),
                 target="cat", split=None, seed=0)  # fmt: skip
    assert method.lr_factor(0) == 0 and method.lr_factor(5) == 0.5 and method.lr_factor(10) == 1
    # Half way through the first of two cycles over the 90 post-warm-up steps: cos(pi/2).
    assert math.isclose(method.lr_factor(10 + 45 // 2), 0.5 * (1 + math.cos(math.pi * 22 / 45)))


def test_max_iterations_keeps_the_warm_up_its_share_of_the_run():
    from crce.study import resolve_method

    def resolved(bound):
        sections = {"train": {"max_iterations": bound}}
        return resolve_method("spm", {"strategy": "spm"}, sections).settings

    assert (resolved(60).iterations, resolved(60).lr_warmup) == (60, 10)  # official 500 of 3,000
    assert resolved(5000) == SpmSettings(strategy="spm")  # not bounded: the official schedule
    assert resolve_method("e", {"strategy": "esd"}, {"train": {"max_iterations": 3}}).settings == (
        resolve_method("e", {"strategy": "esd", "iterations": 3}, {}).settings
    )


def test_the_matching_score_on_hand_made_embeddings():
    target = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    prompts = torch.tensor([[[1.0, 0.0], [0.0, 1.0]],  # the same states: cosine 1
                            [[0.0, 1.0], [-1.0, 0.0]],  # orthogonal: cosine 0
                            [[1.0, 0.0], [0.0, 0.0]]])  # cosine 1/sqrt(2)  # fmt: skip
    tokens = [[7], [5, 7], [9]]  # the target's tokens are {5, 7}
    both = matching_scores(prompts, tokens, target, torch.tensor([5, 7]), "clipcos_tokenuni")
    assert torch.allclose(both, torch.tensor([1.0, 1.0, 1 / math.sqrt(2)]))
    share = matching_scores(prompts, tokens, target, torch.tensor([5, 7]), "tokenuni")
    assert torch.allclose(share, torch.tensor([0.5, 1.0, 0.0]))


def spm_delta(tiny_model, cat_split, path, scorer=True):
    pipe = load_pipeline(tiny_model)
    settings = {"strategy": "spm", "iterations": 1, "rollout_steps": 3, "precision": "float32"}
    engine = Engine.from_settings(pipe, {"spm": settings}, target="cat", split=cat_split, seed=0)
    method = engine.methods["spm"]
    randomised(method.adapter, 0.2)
    tensors = engine.deltas()["spm"]
    if not scorer:
        tensors = {k: v for k, v in tensors.items() if ".scorer." not in k}
    save_delta(tensors, path, method="spm", concept="cat", extra=method.delta_metadata())
    return method.settings


def test_transport_changes_exactly_the_images_whose_multiplier_is_below_one(
    tiny_model, cat_split, tmp_path
):
    delta = tmp_path / "delta.safetensors"
    settings = spm_delta(tiny_model, cat_split, delta)
    plan = plan_images(cat_split, method="spm", seed=0, images_per_prompt=1).iloc[:10]
    transport = Spm.sampling(settings, str(delta), {"id": "cat", "text": "cat"})
    merged = load_erased_pipeline(tiny_model, str(delta), dtype=torch.float32, device="cpu")
    m = transport.multipliers(merged, list(plan["prompt"]))
    assert (m == 1).any() and (m < 1).any(), m
    for folder, sampling in (("merged", None), ("transport", transport)):
        pipe = load_erased_pipeline(tiny_model, str(delta), dtype=torch.float32, device="cpu")
        if sampling:
            pipe = sampling.pipeline(pipe)
        sample_images(pipe, plan, tmp_path / folder, steps=2, guidance=3.0, resolution=32,
                      batch_size=5, sampling=sampling, progress=False)  # fmt: skip
    for path, multiplier in zip(plan["path"], m.tolist(), strict=True):
        same = (tmp_path / "merged" / path).read_bytes() == (
            tmp_path / "transport" / path
        ).read_bytes()
        assert same == (multiplier == 1.0), (path, multiplier)
    assert content_tokens(merged.tokenizer, "cat")  # the scorer's tokens exist


def test_an_spm_delta_without_its_scorer_is_an_error_naming_the_file(
    tiny_model, cat_split, tmp_path
):
    delta = tmp_path / "no-scorer.safetensors"
    settings = spm_delta(tiny_model, cat_split, delta, scorer=False)
    with pytest.raises(ValueError, match=f"{delta}: an SPM delta without its transport scorer"):
        Spm.sampling(settings, str(delta), {"id": "cat", "text": "cat"})
