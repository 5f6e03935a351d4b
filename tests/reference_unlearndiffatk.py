"""A second opinion on UnlearnDiffAtk, written as the official code runs it
(OPTML-Group/Diffusion-MU-Attack@5a3e5d3: src/attackers/text_grad_.py `TextGrad.run` with
`insertion_location: prefix_k`, `sequential: true`; src/tasks/classifier_.py `get_loss`,
`str2id`, `id2embedding`; src/tasks/utils/text_encoder.py `CustomTextEncoder`): the prefix as
a [1, k, V] parameter, every embedding as one-hot @ the token table, the text encoder run on
`inputs_embeds` with its own causal mask. It imports nothing of crce.

The official code draws from torch's global generator (`torch.multinomial`, `torch.randn`);
here one generator is handed in, so a test can give both this and the pipeline the same draws.
Its classifier and early stop are not here: the pipeline judges every round instead.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def bisection(a, eps, xi=1e-5, ub=1):
    pa = torch.clip(a, 0, ub)
    if np.abs(torch.sum(pa).item() - eps) <= xi:
        upper_S_update = pa
    else:
        mu_l = torch.min(a - 1).item()
        mu_u = torch.max(a).item()
        while np.abs(mu_u - mu_l) > xi:
            mu_a = (mu_u + mu_l) / 2
            gu = torch.sum(torch.clip(a - mu_a, 0, ub)) - eps
            gu_l = torch.sum(torch.clip(a - mu_l, 0, ub)) - eps + 1e-8
            gu_u = torch.sum(torch.clip(a - mu_u, 0, ub)) - eps
            if gu == 0:
                break
            elif gu_l == 0:
                mu_a = mu_l
                break
            elif gu_u == 0:
                mu_a = mu_u
                break
            if gu * gu_l < 0:
                mu_l = mu_l
                mu_u = mu_a
            elif gu * gu_u < 0:
                mu_u = mu_u
                mu_l = mu_a
            else:
                raise Exception()
        upper_S_update = torch.clip(a - mu_a, 0, ub)
    return upper_S_update


def projection(curr_var, xi=1e-5):
    var_list = []
    curr_var = torch.squeeze(curr_var, dim=0)
    for i in range(curr_var.size(0)):
        var_list.append(bisection(curr_var[i], eps=1, xi=xi, ub=1))
    return torch.stack(var_list, dim=0).unsqueeze(0)


class STERandSelect(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, generator):
        input = torch.squeeze(input, dim=0)
        num_classes = input.size(-1)
        res = torch.multinomial(input, 1, generator=generator)
        out = res.view(-1)
        out = F.one_hot(out, num_classes=num_classes).float()
        return torch.unsqueeze(out, dim=0)

    @staticmethod
    def backward(ctx, grad_output):
        return F.hardtanh(grad_output), None


def custom_text_encoder(text_encoder, inputs_embeds):
    """CustomTextEncoder.forward: the embeddings of `inputs_embeds`, a causal mask, the
    encoder, the final layer norm."""
    model = getattr(text_encoder, "text_model", text_encoder)
    hidden = model.embeddings(inputs_embeds=inputs_embeds)
    length = hidden.shape[1]
    mask = torch.full((length, length), torch.finfo(hidden.dtype).min)
    mask = torch.triu(mask, 1)[None, None]
    out = model.encoder(inputs_embeds=hidden, attention_mask=mask)
    return model.final_layer_norm(out[0])


def attack(*, unet, text_encoder, tokenizer, alphas_cumprod, x0, prompt, k, iterations, sampled_t,
           lr, weight_decay, generator):  # fmt: skip
    """TextGrad.run for one prompt; returns [(t, prompt, total loss)] per round and the final
    distributions."""
    all_embeddings = text_encoder.get_input_embeddings().weight.unsqueeze(0)
    vocab = all_embeddings.shape[1]
    eos = tokenizer.eos_token_id

    def str2id(text):
        return tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length,
                         return_tensors="pt", truncation=True).input_ids  # fmt: skip

    def id2embedding(input_ids):
        one_hot = F.one_hot(input_ids.view(-1), num_classes=vocab).float()
        return torch.unsqueeze(one_hot, 0) @ all_embeddings

    input_ids = str2id(prompt)
    orig_prompt_len = int((input_ids == eos).nonzero(as_tuple=True)[1][0]) - 1
    rest = tokenizer.model_max_length - 1 - orig_prompt_len - k
    sot_embd, mid_embd, _, eot_embd = torch.split(id2embedding(input_ids),
                                                  [1, orig_prompt_len, k, rest], dim=1)  # fmt: skip
    sot_id, mid_id, _, eot_id = torch.split(input_ids, [1, orig_prompt_len, k, rest], dim=1)

    tmp = torch.zeros([1, k, vocab]).fill_(1 / vocab)
    adv_embedding = torch.nn.Parameter(tmp)
    adv_embedding.data = projection(adv_embedding).data
    adv_embedding = adv_embedding.detach().requires_grad_(True)
    optimizer = torch.optim.Adam([adv_embedding], lr=lr, weight_decay=weight_decay)
    criterion = torch.nn.MSELoss()

    def get_loss(t, input_embeddings):
        noise = torch.randn(x0.shape, generator=generator)
        a = alphas_cumprod[t]
        noised_latent = x0 * (a**0.5) + noise * ((1 - a) ** 0.5)
        encoder_hidden_states = custom_text_encoder(text_encoder, input_embeddings)
        noise_pred = unet(noised_latent, t, encoder_hidden_states=encoder_hidden_states).sample
        return criterion(noise, noise_pred)

    rounds = []
    for t in sampled_t:
        total_loss = 0
        for _ in range(iterations):
            optimizer.zero_grad()
            adv_one_hot = STERandSelect.apply(adv_embedding, generator)
            tmp_embeds = adv_one_hot @ all_embeddings
            adv_input_embeddings = torch.cat([sot_embd, tmp_embeds, mid_embd, eot_embd], dim=1)
            loss = get_loss(t, adv_input_embeddings)
            adv_embedding.grad = torch.autograd.grad(loss, [adv_embedding])[0]
            optimizer.step()
            adv_embedding.data = projection(adv_embedding).data
            total_loss += loss.item()
        proj_ids = torch.argmax(torch.squeeze(adv_embedding, 0), dim=-1).unsqueeze(0)
        new_id = torch.cat([sot_id, proj_ids, mid_id, eot_id], dim=1)
        id_list = [i for i in new_id[0][1:].tolist() if i != eos]
        rounds.append((t, tokenizer.decode(id_list), total_loss))
    return rounds, adv_embedding.detach()[0]
