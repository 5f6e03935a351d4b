"""The trained tensors' copies: one method's masters swapped in functionally, or one copy per
method of every selected Linear so one batched UNet call serves a whole group."""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F

from . import TrainingError


def master(tensor: torch.Tensor) -> torch.Tensor:
    """A trained tensor's master copy: fp32, or the model's own dtype when wider (fp64)."""
    return tensor.detach().to(torch.promote_types(tensor.dtype, torch.float32)).clone()


class SwapCopies:
    """One method, any parameter set: the UNet holds the fp32 trained tensors; frozen calls
    swap in a copy of the base tensors functionally (no second UNet)."""

    def __init__(self, unet, names: list[str]):
        parameters = dict(unet.named_parameters())
        for name in names:
            parameters[name].data = master(parameters[name].data)
            parameters[name].requires_grad_(True)
        self.trained = [{name: parameters[name] for name in names}]
        self.frozen = {name: parameters[name].detach().clone() for name in names}

    def __call__(self, forward, latents, timestep, context, slices, **kwargs):
        if slices is None:
            return torch.func.functional_call(
                forward,
                self.frozen,
                (latents, timestep),
                {"encoder_hidden_states": context, **kwargs},
                strict=False,
            ).sample
        return forward(latents, timestep, encoder_hidden_states=context, **kwargs).sample


class MultiLinear(torch.nn.Module):
    """A Linear with one trainable copy of its selected tensors per method: batch slice k is
    computed with copy k; outside a routed call the base tensors serve (the frozen model)."""

    def __init__(self, base: torch.nn.Linear, trained: list[str], copies: int):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.trained = trained  # "weight" and/or "bias"
        self.copies = torch.nn.ModuleList()
        for _ in range(copies):
            copy = torch.nn.Module()
            for attr in trained:
                tensor = master(getattr(base, attr))
                copy.register_parameter(attr, torch.nn.Parameter(tensor))
            self.copies.append(copy)
        self.slices: list[int] | None = None

    def _tensors(self, k: int):
        weight = getattr(self.copies[k], "weight", None) if "weight" in self.trained else None
        bias = getattr(self.copies[k], "bias", None) if "bias" in self.trained else None
        return (self.base.weight if weight is None else weight), (
            self.base.bias if bias is None else bias
        )

    def forward(self, x):
        if self.slices is None:
            return F.linear(x, self.base.weight, self.base.bias)
        tensors = [self._tensors(k) for k in range(len(self.copies))]
        if len(set(self.slices)) == 1 and all(b is None for _, b in tensors):
            # Equal slices (the x_t rollout): one batched matmul for every method.
            weights = torch.stack([w for w, _ in tensors]).to(x.dtype)
            groups = x.reshape(len(tensors), -1, x.shape[-1])
            return torch.bmm(groups, weights.transpose(1, 2)).reshape(*x.shape[:-1], -1)
        parts = x.split(self.slices)
        return torch.cat([F.linear(p, w, b) for p, (w, b) in zip(parts, tensors, strict=True)])


class LinearCopies:
    """Several methods over Linear layers (every attn2 set): each selected Linear becomes a
    `MultiLinear`, so one UNet call computes every method's slice with its own tensors."""

    def __init__(self, unet, names: list[str], copies: int):
        by_module: dict[str, list[str]] = defaultdict(list)
        for name in names:
            module, attr = name.rsplit(".", 1)
            by_module[module].append(attr)
        self.layers: list[MultiLinear] = []
        self.trained: list[dict[str, torch.nn.Parameter]] = [{} for _ in range(copies)]
        for path, attrs in by_module.items():
            base = unet.get_submodule(path)
            if type(base) is not torch.nn.Linear:
                raise TrainingError(
                    f"grouped training needs Linear layers; {path} is {type(base).__name__} "
                    "(train this parameter set one method at a time)"
                )
            layer = MultiLinear(base, attrs, copies)
            unet.set_submodule(path, layer)
            self.layers.append(layer)
            for k, copy in enumerate(layer.copies):
                for attr in attrs:
                    self.trained[k][f"{path}.{attr}"] = getattr(copy, attr)

    def __call__(self, forward, latents, timestep, context, slices, **kwargs):
        for layer in self.layers:
            layer.slices = slices
        try:
            return forward(latents, timestep, encoder_hidden_states=context, **kwargs).sample
        finally:
            for layer in self.layers:
                layer.slices = None
