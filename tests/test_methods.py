"""The method registry and contract: built-ins by name, a method from your own file by
`module:Class`, bad paths refused before any job, and stubs of what the next baselines need
(a denoising loss on reference images, another trainable set, a new token embedding, a
per-prompt sampling hook) running through the engine and the sampler as they are."""

import textwrap

import pandas as pd
import pytest
import torch
from contract_methods import DampedValues, DenoiseReference

from crce import methods as registry
from crce.modeling import load_pipeline
from crce.sample import plan_images, sample_images
from crce.study import SettingsError, Study, resolve_method
from crce.training.engine import Engine

torch.set_num_threads(2)


def test_every_builtin_loads_and_declares_its_kind_and_keys():
    for name, path in registry.BUILTIN.items():
        cls = registry.load(name)
        assert f"{cls.__module__}:{cls.__name__}" == path and cls.name == name
        assert isinstance(cls.kind, registry.Kind)
        fields = set(cls.Settings.model_fields)
        assert set(cls.section_keys()) <= fields and cls.own_keys <= fields, name
        assert all(f.description for k, f in cls.Settings.model_fields.items() if k != "strategy")


def test_a_section_key_a_method_does_not_read_never_reaches_its_params():
    sections = {"train": {"lr": 1e-3, "alpha": 0.5, "sphere": {"radius": 2.0}}}
    esd = resolve_method("esd-x", {"strategy": "esd"}, sections)
    crce = resolve_method("crce", {"strategy": "crce", "n_corefs": 2}, sections)
    assert esd.params()["lr"] == 1e-3 and "alpha" not in esd.params()
    assert crce.params()["alpha"] == 0.5 and "sphere" not in crce.params()
    sphere = resolve_method("s", {"strategy": "sphere", "sphere": {"radius_mode": "relative"}},
                            sections)  # fmt: skip
    assert sphere.settings.sphere.radius == 2.0 and sphere.settings.sphere.radius_mode == "relative"


OWN = '''
from pydantic import Field

from crce.methods import ClosedFormMethod, MethodSettings


class Settings(MethodSettings):
    strength: float = Field(0.5, gt=0, le=1, description="how much of the value to remove")


class Forget(ClosedFormMethod):
    """Remove `strength` of every attn2 value along the target's last-token embedding."""

    Settings = Settings

    def solve(self, pipe):
        from crce.methods.uce import edited_names, last_token_embeddings

        c = last_token_embeddings(pipe, [self.target]).double()[0]
        projector = torch.eye(len(c), dtype=c.dtype) - self.settings.strength * torch.outer(c, c) / c.dot(c)
        weights = dict(pipe.unet.named_parameters())
        return {n: (weights[n].detach().double() @ projector).float().contiguous()
                for n in edited_names(pipe.unet) if ".to_v." in n}


NOT_A_METHOD = 3
'''


def own_module(folder, name="my_lab"):
    package = folder / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "methods.py").write_text("import torch\n" + textwrap.dedent(OWN))
    return package / "methods.py"


@pytest.mark.parametrize(
    "strategy, message",
    [
        ("my_lab.nowhere:Forget", "cannot import module 'my_lab.nowhere'"),
        ("my_lab.methods:Missing", "module 'my_lab.methods' has no attribute 'Missing'"),
        ("my_lab.methods:NOT_A_METHOD", "is not a method"),
        ("magic", "unknown strategy 'magic'"),
    ],
)
def test_a_bad_method_path_names_the_key_and_the_path(tmp_path, monkeypatch, strategy, message):
    own_module(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SettingsError) as caught:
        resolve_method("mine", {"strategy": strategy}, {})
    assert str(caught.value).startswith("methods.mine.strategy:") and message in str(caught.value)


def test_your_own_method_is_validated_by_its_own_settings(tmp_path, monkeypatch):
    own_module(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SettingsError, match=r"methods.mine: strength: .*less than or equal to 1"):
        resolve_method("mine", {"strategy": "my_lab.methods:Forget", "strength": 3}, {})
    with pytest.raises(SettingsError, match="unknown key.*strenght.*its keys: strength"):
        resolve_method("mine", {"strategy": "my_lab.methods:Forget", "strenght": 0.3}, {})
    method = resolve_method("mine", {"strategy": "my_lab.methods:Forget", "label": "Mine"}, {})
    assert method.kind is registry.Kind.CLOSED_FORM and method.label == "Mine"
    assert (
        method.source_sha256()
        and resolve_method("e", {"strategy": "esd"}, {}).source_sha256() is None
    )


@pytest.mark.slow
def test_your_own_method_runs_to_a_table1_row_and_reruns_alone_when_edited(test_world, tmp_path):
    """A method defined outside the package (here written by this test into the world's
    folder) trains, samples and is judged by the same rules as the built-ins."""
    import json

    from helpers import snakemake
    from safetensors.torch import load_file

    world = test_world.copy(tmp_path / "world")
    source = own_module(world.work)
    mine = {"strategy": "my_lab.methods:Forget", "label": "Forget", "strength": 0.75}
    cat = world.subset("cat")  # its jobs on the one concept the assertions read
    args = world.args(sheet=cat, methods={"forget": mine})
    result = snakemake(world.work, "table1", *args)
    assert result.returncode == 0, result.stdout[-3000:]
    table = pd.read_csv(world.work / "results" / "table1.csv")
    assert "Forget" in list(table["method"])
    assert table.set_index("method").loc["Forget"].notna().all()
    delta = load_file(world.work / "results" / "models" / "forget" / "cat" / "delta.safetensors")
    pipe = load_pipeline(str(world.work / "results" / "base-model" / "tiny"))
    from crce.methods.uce import last_token_embeddings

    c = last_token_embeddings(pipe, ["cat"])[0]
    for name, tensor in delta.items():  # the value of the target's direction is 25% of before
        before = dict(pipe.unet.named_parameters())[name].detach() @ c
        assert torch.allclose(tensor @ c, 0.25 * before, atol=1e-5), name
    record = json.loads((world.work / "results/models/forget/cat/train.json").read_text())
    assert record["settings"] == {"strategy": "my_lab.methods:Forget", "strength": 0.75}
    assert world.plan("table1", sheet=cat, methods={"forget": mine}) == {}
    source.write_text(source.read_text() + "\n# an edit\n")
    plan = world.plan("table1", sheet=cat, methods={"forget": mine})
    assert plan["erase"] == 1 and plan["sample"] == 1  # its own jobs, no other method's
    assert "coref_lists" not in plan and "split" not in plan


def test_the_contract_carries_a_denoising_loss_on_images_and_a_new_embedding(tiny_model, cat_split,
                                                                            tmp_path):  # fmt: skip
    """A stub that the engine trains as it is: its own objective on reference latents, its own
    trainable set (mid-block attention) and a new token embedding; deterministic, resumable."""
    from crce.references import ReferenceSet

    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    references = {"anchor": ReferenceSet(latents, {"prompts": ["a photo of cat"],
                                                   "images_per_prompt": 2})}  # fmt: skip

    def engine():
        pipe = load_pipeline(tiny_model)
        method = DenoiseReference(DenoiseReference.Settings(strategy="contract_methods:DenoiseReference",
                                  lr=1e-3, iterations=4, precision="float32"),
                                  target="cat", split=cat_split, seed=1)  # fmt: skip
        return Engine(pipe, {"m": method}, seed=1, references=references), pipe

    first, pipe = engine()
    base = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    assert set(first.trained["m"]) == {n for n in base if n.startswith("mid_block.attentions")}
    summary = first.train(tmp_path / "a", progress=False)["m"]
    assert len(summary["history"]) == 4 and "timestep" in summary["history"][0]
    assert first.extra["m"]["token"].abs().sum() > 0  # the new embedding trained
    changed = [n for n, t in first.tensors()["m"].items() if not torch.equal(t, base[n])]
    assert changed and all(n.startswith("mid_block.attentions") for n in changed)
    untouched = {n for n in base if not n.startswith("mid_block.attentions")}
    assert all(torch.equal(p, base[n]) for n, p in pipe.unet.named_parameters() if n in untouched)
    again, _ = engine()
    again.train(tmp_path / "a", progress=False)  # resumes at the end: nothing to redo
    second, _ = engine()
    second.train(tmp_path / "b", progress=False)
    for name, tensor in first.tensors()["m"].items():
        assert torch.equal(second.tensors()["m"][name], tensor), name
    assert torch.equal(second.extra["m"]["token"], first.extra["m"]["token"])


def test_the_contract_carries_a_per_prompt_sampling_hook(tiny_model, cat_split, tmp_path):
    """The sampler applies a method's hook around every batch: images of prompts that name
    the target differ from the unhooked ones, every other image is the same bytes."""
    from crce.deltas import save_delta

    pipe = load_pipeline(tiny_model)
    method = DampedValues(DampedValues.Settings(strategy="contract_methods:DampedValues",
                                                damping=0.2), target="cat", split=cat_split,
                          seed=0)  # fmt: skip
    delta = tmp_path / "delta.safetensors"
    save_delta(method.solve(pipe), delta, method="damped", concept="cat",
               extra=method.delta_metadata())  # fmt: skip
    plan = plan_images(cat_split, method="damped", seed=0, images_per_prompt=1).iloc[:8]
    names_target = plan["prompt"].str.contains("cat")
    assert names_target.any() and not names_target.all()
    sampling = DampedValues.sampling(method.settings, str(delta), {"id": "cat", "text": "cat"})
    for folder, with_hook in (("plain", None), ("hooked", sampling)):
        sample_images(pipe, plan, tmp_path / folder, steps=2, guidance=3.0, resolution=32,
                      batch_size=8, sampling=with_hook, progress=False)  # fmt: skip
    for path, target in zip(plan["path"], names_target, strict=True):
        same = (tmp_path / "plain" / path).read_bytes() == (tmp_path / "hooked" / path).read_bytes()
        assert same != target, (path, target)


def test_a_method_with_a_hook_is_a_tracked_sampling_param_and_others_are_not():
    config = {
        "seed": 0, "model": {"pretrained": "m"}, "split": {}, "llm": {}, "corefs": {},
        "sample": {}, "judge": {"model": "j", "prompt": "<X>?", "prompt_version": "1"},
        "methods": {"sd": {"strategy": "none"}, "esd-x": {"strategy": "esd"},
                    "damped": {"strategy": "contract_methods:DampedValues"}},
    }  # fmt: skip
    study = Study(config)
    cat = {"id": "cat", "text": "cat", "category": "object"}
    assert not isinstance(study.sampling("sd", cat), dict)
    assert not isinstance(study.sampling("esd-x", cat), dict)
    damped = study.sampling("damped", cat)
    assert damped["concept"] == cat
    assert (
        damped["settings"]["strategy"] == "contract_methods:DampedValues"
        and damped["source_sha256"]
    )
