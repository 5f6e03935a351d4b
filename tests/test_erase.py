"""The trainer against an independent naive reference, and the properties of a real erasure."""

import pytest
import torch
from reference_trainer import ReferenceTrainer
from safetensors.torch import load_file

from crce.methods.sphere import SphereSettings, sphere_neighbours
from crce.modeling import load_pipeline
from crce.settings import TrainRuntime
from crce.study import SettingsError, resolve_method
from crce.training import TrainingError
from crce.training.engine import Engine

torch.set_num_threads(2)

CASES = {
    "esd-x": dict(strategy="esd"),
    "crce-target": dict(strategy="crce", n_corefs=5, n_retains=3, coref_anchor="target"),
    "crce-self": dict(strategy="crce", n_corefs=5, n_retains=3, coref_anchor="self"),
    "crce-fixed": dict(strategy="crce", n_corefs=5, n_retains=3, fixed=True),
    "crce-frozen-xt-qk": dict(
        strategy="crce", n_corefs=2, n_retains=2, xt_model="frozen", params="xattn-qk"
    ),
    # As the official code computes them: own anchors and means (sphere), sums and the
    # target's anchor on alternate iterations (RealEra).
    "crce-sphere": dict(strategy="sphere", n_corefs=3, n_retains=2, coref_anchor="self"),
    "realera": dict(strategy="realera", n_corefs=3, n_retains=2, coref_anchor="target"),
}
COMMON = dict(lr=1e-4, ddim_steps=6, eta=1.0, start_guidance=3.0)
SPHERE = dict(radius=1.2, radius_mode="relative")  # the tiny text space (config/README.md)
SEED = 123


SPHERICAL = ("sphere", "realera")


def settings_of(strategy="esd", **settings):
    """A method's params as the workflow hands them over (the tiny world's sphere)."""
    if strategy in SPHERICAL:
        settings.setdefault("sphere", SPHERE)
    return {"strategy": strategy, **settings}


def eraser(pipe, split, seed=SEED, runtime=None, **settings):
    return Engine.from_settings(pipe, {"m": settings_of(**settings)}, target="cat", split=split,
                                seed=seed, runtime=runtime)  # fmt: skip


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_the_official_computation(tiny_model, cat_split, case):
    kw = {**COMMON, **CASES[case]}
    ours = eraser(load_pipeline(tiny_model), cat_split, **kw, iterations=3, precision="float32")
    ref = ReferenceTrainer(load_pipeline(tiny_model), "cat", cat_split, **kw, **SPHERE, seed=SEED)

    # Iteration 0 (RealEra: a neighbour iteration), then 1 and 2 (RealEra: ESD, neighbours).
    ours.optimizer.zero_grad()
    loss = ours.losses(0)["m"]
    loss.backward()
    ref.optimizer.zero_grad()
    ref_loss = ref.loss(0)
    ref_loss.backward()
    assert rel(loss.detach(), ref_loss.detach()) <= 1e-5
    ref_grads = ref.grads()
    assert set(ref_grads) == set(ours.trained["m"])
    for name, grad in ref_grads.items():
        assert grad.abs().sum() > 0, f"{name}: zero gradient, the test would prove nothing"
        assert rel(ours.trained["m"][name].grad, grad) <= 1e-5, name
    ours.optimizer.step()
    ref.optimizer.step()
    for iteration in (1, 2):
        ours.step(iteration)
        ref.step(iteration)
    for name, tensor in ref.tensors().items():
        assert rel(ours.trained["m"][name].detach(), tensor) <= 1e-5, name
    last = ours.objective.last_step
    assert [(last["ddim_index"], last["timestep"])] == ref.timesteps[-1:]


@pytest.mark.parametrize("ddim_steps", [4, 50])
def test_unet_timestep_matches_the_noise_level_of_x_t(tiny_model, cat_split, ddim_steps):
    """Every loss prediction is made at a timestep within one DDIM stride of the noise level
    of the x_t it is given (x_t after i rollout steps sits one stride below the last step's
    timestep); i is drawn from 1..ddim_steps-2 as the official randint(1, nsteps - 1)."""
    erase = eraser(load_pipeline(tiny_model), cat_split, ddim_steps=ddim_steps, iterations=1)
    calls = []
    forward = erase.unet.forward

    def spy(sample, timestep, *args, **kwargs):
        calls.append(int(timestep))
        return forward(sample, timestep, *args, **kwargs)

    erase.unet.forward = spy
    stride = 1000 // ddim_steps
    drawn = set()
    with torch.no_grad():
        for iteration in range(12 if ddim_steps == 4 else 4):
            calls.clear()
            erase.losses(iteration)
            i = erase.objective.last_step["ddim_index"]
            drawn.add(i)
            rollout, loss_calls = calls[:i], calls[i:]
            assert len(loss_calls) == 2  # one frozen and one trainable call
            noise_level = rollout[-1] - stride  # x_t after the last rollout step
            for timestep in loss_calls:
                assert abs(timestep - noise_level) <= stride, (i, timestep, noise_level)
    assert drawn <= set(range(1, ddim_steps - 1)) and (ddim_steps != 4 or drawn == {1, 2})


def test_every_method_of_a_concept_draws_the_same_noise(tiny_model, cat_split):
    """Paired training noise: i and x_T depend on (seed, concept, iteration), not the method."""
    draws = []
    for settings in (dict(strategy="esd"), dict(strategy="crce"), dict(strategy="realera")):
        erase = eraser(load_pipeline(tiny_model), cat_split, ddim_steps=8, **settings)
        draws.append([erase.objective.draw(k)[:2] for k in range(5)])
    for other in draws[1:]:
        for (i, noise), (j, other_noise) in zip(draws[0], other, strict=True):
            assert i == j and torch.equal(noise, other_noise)
    assert len({i for i, _ in draws[0]}) > 1


def test_a_checkpoint_of_another_trainer_version_is_not_resumed(
    tiny_model, cat_split, tmp_path, monkeypatch
):
    import crce.training.engine

    settings = dict(strategy="esd", lr=1e-3, iterations=2, ddim_steps=3)
    eraser(load_pipeline(tiny_model), cat_split, **settings).train(tmp_path, progress=False)
    assert eraser(load_pipeline(tiny_model), cat_split, **settings).load_checkpoint(tmp_path)[0]
    version = crce.training.engine.TRAINER_VERSION
    monkeypatch.setattr(crce.training.engine, "TRAINER_VERSION", version + 1)
    again = eraser(load_pipeline(tiny_model), cat_split, **settings)
    assert again.load_checkpoint(tmp_path)[0] == 0


def test_default_trains_only_attn2_kv_and_qk_option(tiny_model, cat_split):
    kv = eraser(load_pipeline(tiny_model), cat_split, iterations=1).trained["m"]
    assert kv and all(".attn2.to_k." in n or ".attn2.to_v." in n for n in kv)
    qk = eraser(load_pipeline(tiny_model), cat_split, iterations=1, params="xattn-qk").trained["m"]
    assert all(".attn2.to_q." in n or ".attn2.to_k." in n for n in qk)


def test_erasure_is_real(tiny_model, cat_split):
    pipe = load_pipeline(tiny_model)
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    erase = eraser(pipe, cat_split, seed=5, strategy="esd", lr=2e-3, iterations=25, ddim_steps=4)

    def distance_to_anchor(trained: bool) -> float:
        total = 0.0
        with torch.no_grad():
            for k in range(100, 106):
                ddim_index, noise, _ = erase.objective.draw(k)
                x = erase.objective.sample_xt(ddim_index, noise)
                t = torch.tensor(500)
                uncond, target = erase.prompts.uncond, erase.prompts.target
                frozen = erase.predict(torch.cat([x, x]), t, torch.cat([uncond, target]))
                anchor = frozen[0:1] - (frozen[1:2] - frozen[0:1])
                pred = erase.predict(x, t, target, [1] if trained else None)
                total += (pred - anchor).pow(2).mean().item()
        return total

    before = distance_to_anchor(trained=False)
    erase.train(progress=False)
    after = distance_to_anchor(trained=True)
    assert after < before
    for name, tensor in pipe.unet.state_dict().items():
        if name not in erase.trained["m"]:
            assert torch.equal(tensor, base[name]), name
        else:
            assert not torch.equal(tensor, base[name]), name


def test_resume_after_a_kill_matches_an_uninterrupted_run(tiny_model, cat_split, tmp_path):
    settings = dict(strategy="crce", n_corefs=3, n_retains=2, lr=1e-3, iterations=5, ddim_steps=4)
    runtime = TrainRuntime(checkpoint_every=2)

    def make():
        return eraser(load_pipeline(tiny_model), cat_split, seed=9, runtime=runtime, **settings)

    straight = make()
    straight.train(tmp_path / "a", progress=False)

    class Killed(Exception):
        pass

    def kill_after_2(iteration):
        if iteration == 2:
            raise Killed  # a preempted job: iteration 2 done, its last checkpoint after 1

    with pytest.raises(Killed):
        make().train(tmp_path / "b", progress=False, on_iteration=kill_after_2)
    second = make()
    summary = second.train(tmp_path / "b", progress=False)["m"]
    assert summary["resumed_at"] == 2
    for name, tensor in straight.deltas()["m"].items():
        assert torch.equal(second.deltas()["m"][name], tensor), name
    again = straight.train(tmp_path / "a", progress=False)["m"]
    assert summary["loss"]["every"] == again["loss"]["every"]
    assert summary["history"] == again["history"]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_model, cat_split, tmp_path):
    erase = eraser(load_pipeline(tiny_model), cat_split, seed=1, strategy="esd", lr=1e30,
                   iterations=6, ddim_steps=3, runtime=TrainRuntime(checkpoint_every=1))  # fmt: skip
    with pytest.raises(
        TrainingError, match=r"loss is (nan|inf|-inf) at iteration \d.*checkpoint kept"
    ):
        erase.train(tmp_path, progress=False)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    losses = [h["loss"] for h in state["history"]["m"]]
    assert state["iteration"] >= 1 and all(torch.isfinite(torch.tensor(losses)))


def test_too_few_train_items_is_a_clear_error(tiny_model, cat_split):
    with pytest.raises(TrainingError, match="M=11 corefs.*has 10"):
        eraser(load_pipeline(tiny_model), cat_split, strategy="crce", n_corefs=11)


@pytest.mark.parametrize(
    "spec, named",
    [
        ({"strategy": "magic"}, "magic"),
        ({"strategy": "esd", "params": "everything"}, "everything"),
        ({"strategy": "esd", "n_corefs": 3}, "n_corefs"),  # ESD draws no corefs
    ],
)
def test_unknown_names_fail(spec, named):
    with pytest.raises(SettingsError, match=f"methods.x.*{named}"):
        resolve_method("x", spec, {})


@pytest.mark.parametrize("mode, radius", [("relative", 1.2), ("absolute", 400.0)])
def test_sphere_neighbours_obey_their_rules(mode, radius):
    # A stack [uncond; cond] of LayerNorm outputs: |e| = sqrt(numel); 2x77x768 is CLIP-L's.
    shape = (2, 16, 32) if mode == "relative" else (2, 77, 768)
    stack = torch.nn.functional.layer_norm(torch.randn(shape), shape[-1:])
    sphere = SphereSettings(radius=radius, radius_mode=mode)
    corefs, retains = sphere_neighbours(stack, 10, 2, sphere, torch.Generator().manual_seed(0))
    assert corefs.shape == (10, *shape) and retains.shape == (2, *shape)
    cos = lambda n: torch.nn.functional.cosine_similarity(n.flatten(), stack.flatten(), dim=0)  # noqa: E731
    limit = radius * (stack.norm() if mode == "relative" else 1)
    for n in corefs:
        assert 0.5 <= cos(n) <= 0.9
        assert (n - stack).norm() <= limit + 1e-3
    for n in retains:
        assert cos(n) < 0.5 and (n - stack).norm() <= limit + 1e-3
    again = sphere_neighbours(stack, 10, 2, sphere, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], corefs) and torch.equal(again[1], retains)


def test_an_unreachable_cosine_band_fails_clearly():
    stack = torch.nn.functional.layer_norm(torch.randn(2, 16, 32), (32,))
    band = SphereSettings(radius=1.2, radius_mode="relative", coref_cos_min=0.999)
    with pytest.raises(TrainingError, match="no neighbour in its cosine band within 300 draws"):
        sphere_neighbours(stack, 3, 2, band, torch.Generator().manual_seed(0), max_draws=300)


@pytest.mark.parametrize("strategy, m, n", [("sphere", 5, 3), ("realera", 10, 2)])
def test_sphere_strategies_are_deterministic_and_learn(tiny_model, cat_split, strategy, m, n):
    settings = dict(
        strategy=strategy, n_corefs=m, n_retains=n, lr=2e-3, iterations=16, ddim_steps=4
    )
    runs = []
    for _ in range(2):
        erase = eraser(load_pipeline(tiny_model), cat_split, seed=2, **settings)
        runs.append((erase.train(progress=False)["m"]["loss"]["every"], erase.deltas()["m"]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
    # The loss on a fixed iteration's batch falls with training.
    erase = eraser(load_pipeline(tiny_model), cat_split, seed=2, **settings)
    probe = 0  # a neighbour iteration for RealEra (even)
    with torch.no_grad():
        start = erase.losses(probe)["m"].item()
    for it in range(16):
        erase.step(it)
    with torch.no_grad():
        end = erase.losses(probe)["m"].item()
    assert end < start


def test_delta_loads_into_a_pipeline(tiny_model, cat_split, tmp_path):
    from crce.erase import run

    split_path = tmp_path / "split.json"
    split_path.write_text(cat_split.model_dump_json())
    settings = settings_of("crce", iterations=2, ddim_steps=3, lr=1e-3, precision="float32")
    output = tmp_path / "crce" / "cat" / "delta.safetensors"
    run(
        methods={"crce": settings},
        model=tiny_model,
        seed=1,
        runtime={"device": "cpu", "checkpoint_every": 1},
        split_path=str(split_path),
        outputs={"crce": str(output)},
        checkpoint_dir=str(tmp_path / "ckpt"),
    )
    tensors = load_file(output)
    assert tensors and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in tensors)
    pipe = load_pipeline(tiny_model)
    result = pipe.unet.load_state_dict(tensors, strict=False)
    assert not result.unexpected_keys
    import json

    record = json.loads((output.parent / "train.json").read_text())
    assert record["iterations"] == 2 and record["it_per_s"] > 0 and "torch" in record["versions"]


GROUP = {
    "esd-x": dict(strategy="esd", lr=3e-3),
    "crce": dict(strategy="crce", n_corefs=3, n_retains=2, lr=2e-3),
    "crce-fixed": dict(strategy="crce", n_corefs=3, n_retains=2, fixed=True, eta=2.0),
    "crce-sphere": dict(strategy="sphere", n_corefs=2, n_retains=2, coref_anchor="self"),
    "realera": dict(strategy="realera", n_corefs=3, n_retains=1, beta=0.5),
}


def group_settings(**shared):
    shared = {"iterations": 4, "ddim_steps": 6, "precision": "float32", "lr": 1e-3, **shared}
    return {name: settings_of(**{**shared, **kw}) for name, kw in GROUP.items()}


def trained_changes(pipe_dtype, tiny_model, cat_split, settings, methods):
    """Each method's change (trained - base tensors) after training `methods` as one run."""
    pipe = load_pipeline(tiny_model, dtype=pipe_dtype)
    base = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    run = Engine.from_settings(pipe, {m: settings[m] for m in methods}, target="cat",
                               split=cat_split, seed=SEED)  # fmt: skip
    history = run.train(progress=False)
    return {m: {n: t - base[n].to(t.dtype) for n, t in run.deltas()[m].items()} for m in methods}, {
        m: [h["ddim_index"] for h in history[m]["history"]] for m in methods
    }


@pytest.mark.parametrize(
    "dtype, tolerance, xt_model",
    [
        # The grouped computation is the separate one: in fp64 they agree to rounding.
        (torch.float64, 1e-9, "trained"),
        (torch.float64, 1e-9, "frozen"),
        # In fp32 a batch of 10 rounds differently from a batch of 2 (5e-7 on the UNet's
        # output), and Adam's first steps are nearly sign(gradient): an element whose gradient
        # is within rounding of zero moves by up to 2 lr. The same separate run on 1 thread
        # instead of 2 moves by up to 3.5e-5 (BENCHMARKS.md): that is fp32's floor here.
        (torch.float32, 1e-4, "trained"),
    ],
)
def test_a_grouped_run_equals_separate_runs(tiny_model, cat_split, dtype, tolerance, xt_model):
    """One batched job for five methods changes each method's tensors as its own run would
    (paired randomness; each slice of a batch computed with its own method's tensors)."""
    settings = group_settings(xt_model=xt_model)
    grouped, grouped_draws = trained_changes(dtype, tiny_model, cat_split, settings, list(settings))
    for method in settings:
        (alone, draws) = trained_changes(dtype, tiny_model, cat_split, settings, [method])
        assert draws[method] == grouped_draws[method]
        for name, change in alone[method].items():
            assert change.abs().sum() > 0, f"{method}: {name} did not train"
            assert rel(grouped[method][name], change) <= tolerance, (method, name)


def test_a_grouped_run_resumes_bit_exactly(tiny_model, cat_split, tmp_path):
    settings = group_settings()
    runtime = TrainRuntime(checkpoint_every=2)

    def make():
        return Engine.from_settings(load_pipeline(tiny_model), settings, target="cat",
                                    split=cat_split, seed=3, runtime=runtime)  # fmt: skip

    straight = make()
    straight.train(tmp_path / "a", progress=False)

    def kill_after_2(iteration):
        if iteration == 2:
            raise KeyboardInterrupt  # as the scheduler's SIGINT would

    with pytest.raises(KeyboardInterrupt):
        make().train(tmp_path / "b", progress=False, on_iteration=kill_after_2)
    resumed = make()
    summary = resumed.train(tmp_path / "b", progress=False)
    assert all(s["resumed_at"] == 2 for s in summary.values())
    for method, tensors in straight.deltas().items():
        for name, tensor in tensors.items():
            assert torch.equal(resumed.deltas()[method][name], tensor), (method, name)


def test_methods_that_cannot_share_a_rollout_do_not_group(tiny_model, cat_split):
    settings = group_settings()
    settings["crce"] = {**settings["crce"], "ddim_steps": 8}
    with pytest.raises(TrainingError, match="cannot train as one group"):
        Engine.from_settings(load_pipeline(tiny_model), settings, target="cat", split=cat_split,
                             seed=1)  # fmt: skip


def test_a_delta_file_is_the_same_bytes_every_time_it_is_saved(tmp_path):
    """The sampler fingerprints a delta by its sha256: equal tensors must mean equal files."""
    import json

    from safetensors import safe_open

    from crce.deltas import save_delta

    tensors = {"a.weight": torch.arange(6.0).reshape(2, 3), "b.weight": torch.ones(3)}
    files = []
    for k in range(16):
        path = tmp_path / f"{k}.safetensors"
        save_delta(tensors, path, method="esd-x", concept="cat")
        files.append(path.read_bytes())
    assert all(f == files[0] for f in files)
    with safe_open(str(tmp_path / "0.safetensors"), "pt") as handle:
        assert json.loads(handle.metadata()["crce"]) == {"concept": "cat", "method": "esd-x"}
