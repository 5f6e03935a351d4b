"""Checkpoints made elsewhere as a method: each format, built here from the tiny model, reads
back as exactly the tensors it changed."""

import pytest
import torch
from safetensors.torch import save_file

from crce.methods.external import External, ExternalError, ExternalSettings
from crce.modeling import load_pipeline

CONCEPT = {"id": "cat", "text": "cat", "category": "object"}


def load_delta(unet, settings, concept):
    return External(settings, target=concept["text"], split=None, seed=0).read(unet, concept)


def edited_pipeline(tiny_model):
    """The tiny pipeline with two attn2 modules changed, as an erasure method would."""
    pipe = load_pipeline(tiny_model)
    changed = {}
    with torch.no_grad():
        for name in (
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q",
            "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_out.0",
        ):
            module = pipe.unet.get_submodule(name)
            module.weight.add_(0.01)
            changed[f"{name}.weight"] = module.weight.detach().clone()
            if module.bias is not None:
                module.bias.mul_(2)
                changed[f"{name}.bias"] = module.bias.detach().clone()
    return pipe, changed


def write(fmt, pipe, changed, folder):
    if fmt == "pipeline":
        pipe.save_pretrained(folder / "cat")
        return folder / "{concept}"
    if fmt == "unet":
        pipe.unet.save_pretrained(folder / "cat")
        return folder / "{concept}"
    if fmt == "safetensors":  # a delta with a `unet.` prefix, as some tools write
        save_file(
            {f"unet.{k}": v.contiguous() for k, v in changed.items()}, folder / "cat.safetensors"
        )
        return folder / "{concept}.safetensors"
    # The official CRCE code: FineTunedModel.state_dict() = {module name: module state dict},
    # module names from StableDiffuser.named_modules(), whose UNet attribute is `unet`.
    modules = {}
    for key, tensor in changed.items():
        module, _, attr = key.rpartition(".")
        modules.setdefault(f"unet.{module}", {})[attr] = tensor
    for module in modules:  # a fine-tuned module's state dict holds all its tensors
        for attr, tensor in (
            pipe.unet.get_submodule(module.removeprefix("unet.")).state_dict().items()
        ):
            modules[module].setdefault(attr, tensor)
    torch.save(modules, folder / "cat.pt")
    return folder / "{concept}.pt"


@pytest.mark.parametrize("fmt", ["pipeline", "unet", "safetensors", "crce-pt"])
def test_every_format_reads_back_as_the_tensors_it_changed(tiny_model, tmp_path, fmt):
    pipe, changed = edited_pipeline(tiny_model)
    pattern = write(fmt, pipe, changed, tmp_path)
    base = load_pipeline(tiny_model).unet
    for given in (fmt, "auto"):
        delta, record = load_delta(base, ExternalSettings(path=str(pattern), format=given), CONCEPT)
        assert set(delta) == set(changed), given
        assert all(torch.equal(delta[k], changed[k]) for k in changed)
        assert record["format"] == fmt and record["changed_tensors"] == len(changed)
        assert len(record["sha256"]) == 64


def test_a_missing_checkpoint_names_the_concept_and_the_path(tiny_model, tmp_path):
    base = load_pipeline(tiny_model).unet
    settings = ExternalSettings(path=str(tmp_path / "mace" / "{concept}"))
    with pytest.raises(
        ExternalError, match=rf"'cat' \(cat\): no checkpoint at {tmp_path}/mace/cat"
    ):
        load_delta(base, settings, CONCEPT)


def test_a_checkpoint_for_another_model_is_refused(tiny_model, tmp_path):
    save_file({"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": torch.ones(3, 3)},
              tmp_path / "cat.safetensors")  # fmt: skip
    base = load_pipeline(tiny_model).unet
    with pytest.raises(ExternalError, match="attn2.to_k.weight has shape"):
        load_delta(base, ExternalSettings(path=str(tmp_path / "{concept}.safetensors")), CONCEPT)
