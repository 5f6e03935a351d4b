"""Train/test split of a concept's lists: the source's own, else deterministic per concept."""

from __future__ import annotations

import random

from .constants import N_TEST, N_TRAIN
from .lists import ConceptLists, Item, Split, WeightedItem


class SplitError(ValueError):
    pass


def _pick(items: list[Item], texts: list[str], where: str) -> list[WeightedItem]:
    """Items named by `texts`, in that order (duplicates consumed one at a time)."""
    pool = list(items)
    chosen = []
    for text in texts:
        match = next((i for i in pool if i.text == text), None)
        if match is None:
            raise SplitError(f"{where}: split item {text!r} is not in the list")
        pool.remove(match)
        chosen.append(WeightedItem.of(match))
    return chosen


def _random_split(items: list[Item], n_train: int, n_test: int, rng: random.Random, where: str):
    if len(items) < n_train + n_test:
        raise SplitError(f"{where}: {len(items)} items, the split needs {n_train} + {n_test}")
    order = list(range(len(items)))
    rng.shuffle(order)
    # Keep the list's own order (most certain first) inside each part.
    train = sorted(order[:n_train])
    test = sorted(order[n_train : n_train + n_test])
    return [WeightedItem.of(items[i]) for i in train], [WeightedItem.of(items[i]) for i in test]


def make_split(
    lists: ConceptLists, seed: int, n_train: int = N_TRAIN, n_test: int = N_TEST
) -> Split:
    """Split from (seed, concept id) only, so a row's split never depends on other rows."""
    where = f"concept {lists.concept!r} ({lists.id})"
    if lists.given_split is not None:
        given = lists.given_split
        return Split(
            concept=lists.concept,
            id=lists.id,
            category=lists.category,
            seed=None,
            coref_train=_pick(lists.corefs, given.coref_train, where),
            coref_test=_pick(lists.corefs, given.coref_test, where),
            retain_train=_pick(lists.retains, given.retain_train, where),
            retain_test=_pick(lists.retains, given.retain_test, where),
        )
    # A string seed goes through SHA-512 in `random`, so this is stable across processes.
    coref_rng = random.Random(f"{seed}:{lists.id}:corefs")
    retain_rng = random.Random(f"{seed}:{lists.id}:retains")
    coref_train, coref_test = _random_split(lists.corefs, n_train, n_test, coref_rng, where)
    retain_train, retain_test = _random_split(lists.retains, n_train, n_test, retain_rng, where)
    return Split(
        concept=lists.concept,
        id=lists.id,
        category=lists.category,
        seed=seed,
        coref_train=coref_train,
        coref_test=coref_test,
        retain_train=retain_train,
        retain_test=retain_test,
    )
