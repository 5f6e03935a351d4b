"""Ring-A-Bell (Tsai et al., ICLR 2024), chiayi-hsu/Ring-A-Bell@e4585ad, re-implemented: a
model-agnostic attack on the base model's text encoder alone, so one search per base prompt
serves every erased model.

1. The concept vector (Get_Concept_Vector.ipynb cells 2-3): the mean, over prompt pairs that
   differ by the concept, of the CLIP last hidden states (every position) with it minus
   without it. The notebook encodes each prompt `num_samples` = 5 times; the encoder is
   deterministic, so the mean is the same with each once.
2. The target (InversePrompt.ipynb cell 12): a base prompt's hidden states plus `coef` times
   the vector. The notebook's base prompts are I2P rows; here the concept's own prompt and its
   test corefs.
3. The genetic search (cells 9 and 12): a population of K-token prompts (BOS, K tokens drawn
   from [1, BOS), then EOS padding), fitness the summed squared distance of their hidden
   states to the target; each generation keeps the best half, breeds (one-point crossover,
   two children per chance) and mutates (one random token per chance); the last generation
   only selects. The found prompt is the best individual's K tokens, decoded.

Every draw comes from one torch generator per (seed, concept, base prompt), in the
notebook's order of draws (its `random`, `np.random` and torch draws are three global
generators): the same config finds the same prompts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..files import write_json
from ..seeds import derive_seed
from ..settings import RingABellSettings
from . import AttackError

log = logging.getLogger(__name__)

Individual = tuple[int, ...]  # the K searched token ids (BOS, EOS and padding are fixed)


@dataclass(frozen=True)
class TokenFrame:
    """The fixed tokens around the K searched ones, and the range they are drawn from."""

    bos: int
    eos: int
    pad: int
    high: int  # exclusive: the notebook draws from [1, 49406), below SD v1.4's BOS and EOS
    length: int  # the tokenizer's model_max_length (77 on SD v1.4)

    @classmethod
    def of(cls, tokenizer, k: int) -> TokenFrame:
        length = tokenizer.model_max_length
        if k > length - 2:
            raise AttackError(
                f"attacks.ring_a_bell.length = {k}: more than the tokenizer's length "
                f"{length} minus 2 (BOS and EOS)"
            )
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        return cls(bos=bos, eos=eos, pad=pad, high=min(bos, eos), length=length)

    def ids(self, individuals: Sequence[Individual]) -> torch.Tensor:
        """Full input ids: BOS, the K tokens, EOS, padding (the notebook pads with EOS, which
        is SD v1.4's padding token)."""
        k = len(individuals[0])
        tail = [self.eos] + [self.pad] * (self.length - k - 2)
        return torch.tensor([[self.bos, *ind, *tail] for ind in individuals])


class Draws:
    """The notebook's draws from one generator: `random.random()`, `np.random.randint`."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def random(self) -> float:
        return torch.rand(1, generator=self.generator).item()

    def randint(self, low: int, high: int) -> int:
        return int(torch.randint(low, high, (1,), generator=self.generator).item())

    def tokens(self, k: int, high: int) -> Individual:
        return tuple(torch.randint(1, high, (k,), generator=self.generator).tolist())


@torch.no_grad()
def hidden_states(text_encoder, ids: torch.Tensor, batch: int = 256) -> torch.Tensor:
    device = text_encoder.device
    chunks = [
        text_encoder(ids[i : i + batch].to(device))[0].float() for i in range(0, len(ids), batch)
    ]
    return torch.cat(chunks)


def encode_texts(text_encoder, tokenizer, texts: list[str]) -> torch.Tensor:
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids  # fmt: skip
    return hidden_states(text_encoder, ids)


def concept_vector(text_encoder, tokenizer, pairs: list[tuple[str, str]]) -> torch.Tensor:
    """mean(E(with) - E(without)) over the pairs, every position: [length, width]."""
    with_, without = zip(*pairs, strict=True)
    diff = encode_texts(text_encoder, tokenizer, list(with_)) - encode_texts(
        text_encoder, tokenizer, list(without)
    )
    return diff.mean(0)


class Fitness:
    """The notebook's fitness, ((target - E(ids))**2).sum over positions and width, lower is
    better; with `cache`, an individual already scored (a survivor, or a child equal to one)
    is not encoded again. Only the last generation's scores are kept: memory stays at one
    population's."""

    def __init__(self, text_encoder, target: torch.Tensor, frame: TokenFrame, cache: bool = True):
        self.text_encoder, self.frame, self.cache = text_encoder, frame, cache
        self.target = target.to(text_encoder.device).float()
        self.known: dict[Individual, float] = {}
        self.encoded = 0  # individuals encoded, for the benchmark

    def losses(self, individuals: list[Individual]) -> np.ndarray:
        states = hidden_states(self.text_encoder, self.frame.ids(individuals))
        self.encoded += len(individuals)
        return ((self.target - states) ** 2).sum(dim=(1, 2)).cpu().numpy().astype(np.float64)

    def __call__(self, population: list[Individual]) -> np.ndarray:
        if not self.cache:
            return self.losses(population)
        todo = list(dict.fromkeys(p for p in population if p not in self.known))
        scores = dict(zip(todo, self.losses(todo).tolist(), strict=True)) if todo else {}
        scores |= {p: self.known[p] for p in population if p in self.known}
        self.known = {p: scores[p] for p in population}
        return np.array([scores[p] for p in population], dtype=np.float64)


@dataclass
class SearchResult:
    tokens: Individual
    loss: float
    history: list[float] = field(default_factory=list)  # the best loss of each generation


def crossover(parents: list[Individual], rate: float, draws: Draws) -> list[Individual]:
    """Each parent, and with chance `rate` two children with a random partner, cut at a
    point in [1, K] of the full ids (InversePrompt.ipynb cell 9, `crossover`)."""
    k, children = len(parents[0]), []
    for parent in parents:
        children.append(parent)
        if draws.random() < rate:
            partner = parents[draws.randint(0, len(parents))]
            cut = draws.randint(1, k + 1) - 1  # full-id position 1 is the first token
            children.append(parent[:cut] + partner[cut:])
            children.append(partner[:cut] + parent[cut:])
    return children


def mutation(
    population: list[Individual], rate: float, high: int, draws: Draws
) -> list[Individual]:
    """With chance `rate` one token of an individual set to a random id in [1, high)
    (cell 9, `mutation`: it edits the tensors in place; tuples are rebuilt)."""
    k, out = len(population[0]), []
    for individual in population:
        if draws.random() < rate:
            position = draws.randint(1, k + 1) - 1
            value = draws.randint(1, high)
            individual = individual[:position] + (value,) + individual[position + 1 :]
        out.append(individual)
    return out


def genetic_search(
    fitness: Callable[[list[Individual]], np.ndarray],
    *,
    k: int,
    high: int,
    settings: RingABellSettings,
    draws: Draws,
) -> SearchResult:
    """The notebook's loop (cell 12): score, keep the best half, breed and mutate but on the
    last generation; the best of the last population is the result."""
    population = [draws.tokens(k, high) for _ in range(settings.population)]
    history = []
    for step in range(settings.generations):
        scores = fitness(population)
        order = np.argsort(scores, kind="stable")
        history.append(float(scores[order[0]]))
        population = [population[i] for i in order][: settings.population // 2]
        if step != settings.generations - 1:
            population = mutation(crossover(population, settings.crossover_rate, draws),
                                  settings.mutation_rate, high, draws)  # fmt: skip
        if step % 50 == 0:
            log.info("generation %d: lowest loss %.4f", step + 1, history[-1])
    return SearchResult(tokens=population[0], loss=history[-1], history=history)


# -- the rule ----------------------------------------------------------------------------------
def base_prompts(split, n: int) -> list[tuple[str, str]]:
    """(group, text) of the first `n` of the concept's own prompt and its test corefs."""
    return [("target", split.concept), *(("coref_test", i.text) for i in split.coref_test)][:n]


def search_prompts(*, model: str, split, pairs: list[tuple[str, str]], settings: RingABellSettings,
                   seed: int, device: str = "auto") -> list[dict]:  # fmt: skip
    """One search per base prompt on the base model's text encoder (loaded with
    `from_pretrained`, as the notebook loads it)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from ..modeling import device_for

    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    encoder = encoder.to(device_for(device)).eval()
    frame = TokenFrame.of(tokenizer, settings.length)
    vector = concept_vector(encoder, tokenizer, pairs)
    found = []
    for group, prompt in base_prompts(split, settings.n_base):
        target = encode_texts(encoder, tokenizer, [prompt])[0] + settings.coef * vector
        fitness = Fitness(encoder, target, frame, cache=settings.cache)
        draws = Draws(derive_seed("crce-ring-a-bell", seed, split.id, prompt))
        result = genetic_search(fitness, k=settings.length, high=frame.high,
                                settings=settings, draws=draws)  # fmt: skip
        text = tokenizer.decode(list(result.tokens))
        again = tokenizer(text, add_special_tokens=False).input_ids
        found.append({
            "text": text, "kind": "ring_a_bell", "base_prompt": prompt, "base_group": group,
            "tokens": list(result.tokens), "loss": result.loss, "encoded": fitness.encoded,
            # The notebook writes the decoded text; sampling tokenizes it again, which need
            # not give the searched ids back.
            "round_trip": list(again) == list(result.tokens),
            "history": result.history,
        })  # fmt: skip
        log.info("%s: %r -> %r (loss %.4f, %d encodes)", split.id, prompt, text, result.loss,
                 fitness.encoded)  # fmt: skip
    return found


def run_search(*, split_path, pairs_path, model, settings, seed, output, device="auto"):
    """The `ring_a_bell` rule: a search per base prompt, on the concept's pairs."""
    from ..lists import read_split

    split = read_split(split_path)
    pairs = json.loads(Path(pairs_path).read_text(encoding="utf-8"))
    prompts = search_prompts(model=model, split=split, pairs=[tuple(p) for p in pairs["pairs"]],
                             settings=RingABellSettings(**settings), seed=seed, device=device)  # fmt: skip
    data = {"concept": split.concept, "id": split.id, "attack": "ring_a_bell",
            "pairs": pairs["pairs"], "prompts": prompts}  # fmt: skip
    write_json(data, output)
