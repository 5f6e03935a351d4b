"""A naive second opinion on MACE, in its official code's pattern (Shilin-LU/MACE at 057e7a6):
prepare_k_v's per-pair contexts and per-layer values, closed_form_refinement's running sums
and torch.inverse, LoRA layers beside to_k / to_v with an AttnController that collects the
masked probabilities per layer, AdamW with clip_grad_norm_, then the fusion's all-words sums
on the LoRA-fused layers. Caches per layer as cache_coco.py builds them (mat1 = sum W0 c c^T,
mat2 = sum c c^T). It imports nothing of crce: it repeats the documented randomness protocol
(crce.methods.mace's docstring) on purpose, and takes the augmented prompts as given.
"""

from __future__ import annotations

import copy
import hashlib

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler


def derive(*parts) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def find_matching_indices(old, new):
    start_common = 0
    for i, j in zip(old, new, strict=False):
        if i == j:
            start_common += 1
        else:
            break
    end_common_old = len(old) - 1
    end_common_new = len(new) - 1
    while end_common_old >= start_common and end_common_new >= start_common:
        if old[end_common_old] == new[end_common_new]:
            end_common_old -= 1
            end_common_new -= 1
        else:
            break
    return (list(range(start_common)) + list(range(end_common_old + 1, len(old))),
            list(range(start_common)) + list(range(end_common_new + 1, len(new))))  # fmt: skip


def ca_layers(unet):
    """get_ca_layers: attn2 of every cross-attention block, to_v then to_k, by weight name."""
    layers = [(n, m) for n, m in unet.named_modules() if n.endswith("attn2")]
    return [(f"{n}.to_v.weight", m.to_v) for n, m in layers] + [
        (f"{n}.to_k.weight", m.to_k) for n, m in layers
    ]


def embed(pipe, texts):
    tokens = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        return pipe.text_encoder(tokens.input_ids)[0].double()


def prepare_k_v(pipe, projections, olds, news, all_words=False):
    """Contexts and per-layer values of each pair (cfr_utils.py L59-150)."""
    length = pipe.tokenizer.model_max_length
    old_embs, new_embs = embed(pipe, olds), embed(pipe, news)
    contexts, valuess = [], []
    for k, (old_text, new_text) in enumerate(zip(olds, news, strict=True)):
        if all_words:
            context, source = old_embs[k], old_embs[k]
        else:
            a = pipe.tokenizer(old_text, truncation=True, max_length=length).input_ids
            b = pipe.tokenizer(new_text, truncation=True, max_length=length).input_ids
            old_i, new_i = find_matching_indices(a, b)
            if old_i[-1] >= new_i[-1]:
                old_x = old_i + list(range(old_i[-1] + 1, length))
                new_x = new_i + list(range(new_i[-1] + 1, length - (old_i[-1] - new_i[-1])))
            else:
                new_x = new_i + list(range(new_i[-1] + 1, length))
                old_x = old_i + list(range(old_i[-1] + 1, length - (new_i[-1] - old_i[-1])))
            context, source = old_embs[k][old_x], new_embs[k][new_x]
        contexts.append(context)
        valuess.append([source @ layer.weight.double().T for _, layer in projections])
    return contexts, valuess


def cache(pipe, prompts):
    """cache_coco.py: per layer, mat1 = sum W0 c c^T and mat2 = sum c c^T over every token."""
    projections = ca_layers(pipe.unet)
    contexts, valuess = prepare_k_v(pipe, projections, prompts, prompts, all_words=True)
    out = {}
    for n, (name, _) in enumerate(projections):
        out[f"{name}_for_mat1"] = sum(v[n].T @ c for c, v in zip(contexts, valuess, strict=True))
        out[f"{name}_for_mat2"] = sum(c.T @ c for c in contexts)
    return out


def closed_form_refinement(projections, contexts, valuess, lamb, preserve_scale, cache_dict):
    """cfr_utils.py L153-204 (fp64 here), writing each layer's weight."""
    for n, (name, layer) in enumerate(projections):
        w = layer.weight.double()
        mat1 = lamb * w
        mat2 = lamb * torch.eye(w.shape[1], dtype=torch.float64)
        total1 = sum(v[n].T @ c for c, v in zip(contexts, valuess, strict=True))
        total2 = sum(c.T @ c for c in contexts)
        if cache_dict is not None:
            total1 = total1 + preserve_scale * cache_dict[f"{name}_for_mat1"]
            total2 = total2 + preserve_scale * cache_dict[f"{name}_for_mat2"]
        layer.weight.data = (total1 + mat1) @ torch.inverse(total2 + mat2)


def combined(prior, domain, scale, weight):
    if prior is None:
        return None
    return {k: scale * (prior[k] + weight * (domain[k] if domain else 0.0)) for k in prior}


def positions_of(tokenizer, prompt, target, use_pooler=True):
    """dataset.py L220-243."""
    ids = tokenizer(prompt, truncation=True, padding="max_length",
                    max_length=tokenizer.model_max_length).input_ids  # fmt: skip
    concept = tokenizer(target, add_special_tokens=False).input_ids
    pooler = tokenizer("<|endoftext|>", add_special_tokens=False).input_ids[0]
    out = [0] * tokenizer.model_max_length
    for i, tok in enumerate(ids):
        if tok == concept[0] and ids[i : i + len(concept)] == concept:
            out[i : i + len(concept)] = [1] * len(concept)
        if use_pooler and tok == pooler:
            out[i] = 1
    return torch.tensor(out, dtype=torch.bool)


class Controller:
    """AttnController (cfr_utils.py L212-253)."""

    def __init__(self):
        self.attn_probs = []

    def __call__(self, attn_prob):
        if self.mask is not None:
            d = int(attn_prob.shape[1] ** 0.5)
            resized = F.interpolate(self.mask[None, None].float(), size=(d, d), mode="nearest")
            attn_prob = attn_prob[:, (resized > 0.5).view(-1), :]
        self.attn_probs.append(attn_prob[:, :, self.positions])

    def loss(self):
        return sum(torch.norm(item) for item in self.attn_probs)


class LoraProcessor:
    """mace_lora_atten_processor.py's AttnProcessor with LoRA on to_k and to_v."""

    def __init__(self, down_k, up_k, down_v, up_v, controller):
        self.k, self.v, self.controller = (down_k, up_k), (down_v, up_v), controller

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None):  # fmt: skip
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.to_k(encoder_hidden_states) + encoder_hidden_states @ self.k[0].T @ self.k[1].T
        value = attn.to_v(encoder_hidden_states) + encoder_hidden_states @ self.v[0].T @ self.v[1].T
        key, value = attn.head_to_batch_dim(key), attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(query, key, None)
        self.controller(probs)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out))


def mace(pipe, latents, masks, olds, news, target, *, seed, steps, lr, lamb, rank=1,
         prior=None, domain=None, train_scale=0.0, fuse_scale=0.0, weight=0.0,
         squared=False, importance=True):  # fmt: skip
    """The three stages; returns the fused to_k / to_v weights by UNet name and the losses."""
    pipe = copy.deepcopy(pipe)
    unet = pipe.unet.float()
    unet.requires_grad_(False)
    names = [n for n, _ in unet.named_modules() if n.endswith("attn2")]
    base = {f"{n}.{p}.weight": getattr(unet.get_submodule(n), p).weight.detach().double().clone()
            for n in names for p in ("to_k", "to_v")}  # fmt: skip
    # stage 1 (cfr_lora_training.py L259-326): the code weighs the caches by the scale twice
    projections = ca_layers(unet)
    contexts, valuess = prepare_k_v(pipe, projections, olds, news)
    cache_dict = combined(prior, domain, train_scale, weight)
    closed_form_refinement(projections, contexts, valuess, lamb,
                           train_scale if squared else 1.0, cache_dict)  # fmt: skip
    for _, layer in projections:
        layer.weight.data = layer.weight.data.float()
    refined = {k: unet.get_submodule(k.removesuffix(".weight")).weight.detach().clone()
               for k in base}  # fmt: skip
    # stage 2
    generator = torch.Generator().manual_seed(derive("mace-lora", seed))
    controller, factors = Controller(), {}
    for n in names:
        module = unet.get_submodule(n)
        d_in, d_out = module.to_k.in_features, module.to_k.out_features
        pair = []
        for part in ("to_k", "to_v"):
            down = (torch.randn((rank, d_in), generator=generator) / rank).requires_grad_(True)
            up = torch.zeros((d_out, rank), requires_grad=True)
            factors[f"{n}.{part}"] = (down, up)
            pair += [down, up]
        module.set_processor(LoraProcessor(*pair, controller))
    params = [t for pair in factors.values() for t in pair]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    total = scheduler.config.num_train_timesteps
    prob = [1 / (1 + np.exp(-0.05 * (x - 200))) - 1 / (1 + np.exp(-0.05 * (x - 400)))
            for x in range(total)]  # fmt: skip
    prob = torch.tensor([x / sum(prob) for x in prob], dtype=torch.float64)
    contexts = embed(pipe, olds).float()
    losses, n = [], len(latents)
    for k in range(steps):
        epoch, position = divmod(k, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(
            derive("mace-epoch", seed, epoch)))  # fmt: skip
        item = int(order[position])
        g = torch.Generator().manual_seed(derive("crce-train", seed, k))
        prompt = int(torch.randint(0, len(olds), (1,), generator=g))
        latent = latents[item : item + 1]
        noise = torch.randn(latent.shape, generator=g)
        if importance:
            t = torch.multinomial(prob, 1, generator=g)
        else:
            t = torch.randint(0, total, (1,), generator=g)
        noisy = scheduler.add_noise(latent, noise, t)
        controller.attn_probs = []
        controller.positions = positions_of(pipe.tokenizer, olds[prompt], target)
        controller.mask = None if masks is None else masks[item].bool()
        unet(noisy, t, contexts[prompt : prompt + 1])  # the prediction is not in the loss
        loss = controller.loss()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
    # stage 3 (fuse_lora_close_form.py): LoRA fused into W', all-words sums, the caches once
    fused_layers = []
    for key in base:
        module = unet.get_submodule(key.removesuffix(".weight"))
        down, up = factors[key.removesuffix(".weight")]
        layer = torch.nn.Linear(module.in_features, module.out_features, bias=False).double()
        layer.weight.data = refined[key].double() + (up @ down).detach().double()
        fused_layers.append((key, layer, module))
    contexts, valuess = prepare_k_v(pipe, [(key, layer) for key, layer, _ in fused_layers],
                                    olds, olds, all_words=True)  # fmt: skip
    targets = []
    for key, _, module in fused_layers:
        layer = torch.nn.Linear(module.in_features, module.out_features, bias=False).double()
        layer.weight.data = refined[key].double()
        targets.append((key, layer))
    closed_form_refinement(targets, contexts, valuess, lamb, fuse_scale,
                           combined(prior, domain, 1.0, weight))  # fmt: skip
    return {key: layer.weight.data.float() for key, layer in targets}, losses


def grounded_segmentation(image, labels, threshold, detector_id, segmenter_id):
    """transformer_gsam_utils.py L123-198 (`polygon_refinement=True`), with `labels` a list as
    its signature says (the official call passes a string); None where nothing is found."""
    import cv2
    from transformers import AutoModelForMaskGeneration, AutoProcessor, pipeline

    detector = pipeline(model=detector_id, task="zero-shot-object-detection", device="cpu")
    labels = [label if label.endswith(".") else label + "." for label in labels]
    results = detector(image, candidate_labels=labels, threshold=threshold)
    if not results:
        return None
    segmentator = AutoModelForMaskGeneration.from_pretrained(segmenter_id)
    processor = AutoProcessor.from_pretrained(segmenter_id)
    boxes = [[[r["box"]["xmin"], r["box"]["ymin"], r["box"]["xmax"], r["box"]["ymax"]]
              for r in results]]  # fmt: skip
    inputs = processor(images=image, input_boxes=boxes, return_tensors="pt")
    with torch.no_grad():
        outputs = segmentator(**inputs)
    masks = processor.post_process_masks(masks=outputs.pred_masks,
                                         original_sizes=inputs.original_sizes,
                                         reshaped_input_sizes=inputs.reshaped_input_sizes)[0]  # fmt: skip
    masks = list((masks.cpu().float().permute(0, 2, 3, 1).mean(axis=-1) > 0).int().numpy()
                 .astype(np.uint8))  # fmt: skip
    refined = []
    for mask in masks:
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_SIMPLE)  # fmt: skip
        polygon = max(contours, key=cv2.contourArea).reshape(-1, 2).tolist()
        filled = np.zeros(mask.shape, dtype=np.uint8)
        cv2.fillPoly(filled, [np.array(polygon, dtype=np.int32)], color=(255,))
        refined.append(filled)
    best = max(range(len(results)), key=lambda i: results[i]["score"])
    return refined[best] > 0
