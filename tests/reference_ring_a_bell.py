"""A second opinion on Ring-A-Bell, written as the official notebooks run it
(chiayi-hsu/Ring-A-Bell@e4585ad, InversePrompt.ipynb cells 9 and 12, Get_Concept_Vector.ipynb
cells 2-3): the population as [1, 77] id tensors edited in place, the whole population encoded
every generation, numpy for the concept vector. It imports nothing of crce.

The notebook draws from `random.random()`, `np.random.randint` and `torch.randint` (three
global generators); here `rng` stands in for all three, so a test can hand both this and the
pipeline one stream of draws.
"""

from __future__ import annotations

import numpy as np
import torch


class TorchDraws:
    """`random.random()` and `np.random.randint(low, high)` from one torch generator."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def random(self) -> float:
        return torch.rand(1, generator=self.generator).item()

    def randint(self, low: int, high: int) -> int:
        return int(torch.randint(low, high, (1,), generator=self.generator).item())


def concept_vector(text_encoder, tokenizer, pairs, num_samples: int = 5) -> np.ndarray:
    with_text, without_text = [], []
    for concept_prompt, plain_prompt in pairs:
        for prompts, out in (([concept_prompt] * num_samples, with_text),
                             ([plain_prompt] * num_samples, without_text)):  # fmt: skip
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids  # fmt: skip
            with torch.no_grad():
                out.extend(text_encoder(ids, return_dict=True)[0].detach().numpy())
    return np.mean(np.array(with_text) - np.array(without_text), axis=0)


def search(text_encoder, target_embed, *, bos, eos, high, max_length, population_size,
           generation, mutate_rate, crossover_rate, length, rng, fitness=None):  # fmt: skip
    """The notebook's loop; returns (best ids [K], best loss, the best loss per generation)."""

    def official_fitness(population):
        dummy_tokens = torch.cat(population, 0)
        with torch.no_grad():
            dummy_embed = text_encoder(dummy_tokens)[0]
        losses = ((target_embed - dummy_embed) ** 2).sum(dim=(1, 2))
        return losses.cpu().detach().numpy()

    fitness = fitness or official_fitness

    def crossover(parents, crossover_rate):
        new_population = []
        for i in range(len(parents)):
            new_population.append(parents[i])
            if rng.random() < crossover_rate:
                idx = rng.randint(0, len(parents))
                crossover_point = rng.randint(1, length + 1)
                new_population.append(
                    torch.concat(
                        (parents[i][:, :crossover_point], parents[idx][:, crossover_point:]), 1
                    )
                )
                new_population.append(torch.concat((parents[idx][:, :crossover_point],
                                                    parents[i][:, crossover_point:]), 1))  # fmt: skip
        return new_population

    def mutation(population, mutate_rate):
        for i in range(len(population)):
            if rng.random() < mutate_rate:
                idx = rng.randint(1, length + 1)
                value = rng.randint(1, high)
                population[i][:, idx] = value
        return population

    population = [
        torch.concat((torch.tensor([[bos]]),
                      torch.randint(low=1, high=high, size=(1, length), generator=rng.generator),
                      torch.tile(torch.tensor([[eos]]), [1, max_length - 1 - length])), 1)
        for _ in range(population_size)
    ]  # fmt: skip
    history = []
    for step in range(generation):
        score = fitness(population)
        idx = np.argsort(score, kind="stable")
        history.append(float(score[idx[0]]))
        population = [population[index] for index in idx][: population_size // 2]
        if step != generation - 1:
            new_popu = crossover(population, crossover_rate)
            population = mutation(new_popu, mutate_rate)
    return population[0][0][1 : length + 1].tolist(), history[-1], history
