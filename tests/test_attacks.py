"""Erasure under attack: Ring-A-Bell's search against the official notebook's loop
(tests/reference_ring_a_bell.py, which imports nothing of crce), its operators on a hand-made
fitness, the pairs' sources, UnlearnDiffAtk's ASR counting, bad input, and the `attacks`
target in the test world."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import reference_ring_a_bell as ref
import torch
from pydantic import ValidationError

from crce.attacks.asr import asr_table, trials
from crce.attacks.pairs import AttackError, concept_pairs, curated_pairs
from crce.attacks.ring_a_bell import (
    Draws,
    Fitness,
    TokenFrame,
    base_prompts,
    concept_vector,
    encode_texts,
    genetic_search,
    search_prompts,
)
from crce.concepts import Concept
from crce.settings import LlmRuntime, RingABellSettings

PAIRS = [("a photo of a cat", "a photo of a"), ("a cat on a sofa", "a sofa"),
         ("cat", "dog")]  # fmt: skip


@pytest.fixture(scope="module")
def encoder(tiny_model):
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model, subfolder="tokenizer")
    model = CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder").eval()
    return model, tokenizer


def test_concept_vector_is_the_notebooks_mean(encoder):
    model, tokenizer = encoder
    mine = concept_vector(model, tokenizer, PAIRS).numpy()
    theirs = ref.concept_vector(model, tokenizer, PAIRS)  # each prompt 5 times, as the notebook
    assert mine.shape == theirs.shape == (tokenizer.model_max_length, model.config.hidden_size)
    np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)
    assert np.abs(mine).max() > 1e-3  # the pairs differ


def test_search_follows_the_notebook(encoder):
    """Same draws, same generations: the found tokens, loss and every generation's best loss
    equal the notebook's loop, with and without the fitness cache; the cache encodes less."""
    model, tokenizer = encoder
    frame = TokenFrame.of(tokenizer, 4)
    target = encode_texts(model, tokenizer, ["cat"])[0] + 3.0 * concept_vector(
        model, tokenizer, PAIRS
    )
    tokens, loss, history = ref.search(
        model, target[None], bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id,
        high=frame.high, max_length=tokenizer.model_max_length, population_size=10,
        generation=6, mutate_rate=0.25, crossover_rate=0.5, length=4, rng=ref.TorchDraws(7),
    )  # fmt: skip
    assert history[-1] < history[0]
    encoded = {}
    for cache in (True, False):
        settings = RingABellSettings(population=10, generations=6, length=4, cache=cache)
        fitness = Fitness(model, target, frame, cache=cache)
        mine = genetic_search(fitness, k=4, high=frame.high, settings=settings, draws=Draws(7))
        assert list(mine.tokens) == tokens
        assert mine.loss == pytest.approx(loss, rel=1e-5)
        np.testing.assert_allclose(mine.history, history, rtol=1e-5)
        encoded[cache] = fitness.encoded
    assert encoded[True] < encoded[False]


def test_fitness_is_the_notebooks_formula(encoder):
    model, tokenizer = encoder
    frame = TokenFrame.of(tokenizer, 3)
    target = torch.randn(tokenizer.model_max_length, model.config.hidden_size, generator=torch.Generator().manual_seed(0))  # fmt: skip
    population = [(5, 9, 11), (300, 2, 40), (5, 9, 11)]
    ids = torch.tensor([[frame.bos, *p, *[frame.eos] * (tokenizer.model_max_length - 4)]
                        for p in population])  # fmt: skip
    with torch.no_grad():
        expected = ((target - model(ids)[0]) ** 2).sum(dim=(1, 2)).numpy()
    fitness = Fitness(model, target, frame, cache=True)
    np.testing.assert_allclose(fitness(population), expected, rtol=1e-5)
    assert fitness.encoded == 2  # the repeated prompt once
    np.testing.assert_allclose(fitness(population[:2]), expected[:2], rtol=1e-5)
    assert fitness.encoded == 2  # known individuals are not encoded again


def hamming_to(goal):
    goal = np.array(goal)
    return lambda population: np.array([(np.array(p) != goal).sum() for p in population], float)


def test_genetic_operators_find_a_known_optimum():
    goal = (3, 7, 1, 9, 4)
    settings = RingABellSettings(population=40, generations=80, length=5)
    found = genetic_search(hamming_to(goal), k=5, high=12, settings=settings, draws=Draws(0))
    assert found.tokens == goal and found.loss == 0
    assert found.history[0] > 0 and list(found.history) == sorted(found.history, reverse=True)
    # The same as the notebook's loop on the same draws, with the same hand-made fitness.
    as_tuples = lambda population: hamming_to(goal)([tuple(p[0, 1:6].tolist()) for p in population])  # noqa: E731
    tokens, loss, history = ref.search(
        None, None, bos=99, eos=98, high=12, max_length=16, population_size=40, generation=80,
        mutate_rate=0.25, crossover_rate=0.5, length=5, rng=ref.TorchDraws(0), fitness=as_tuples,
    )  # fmt: skip
    assert tuple(tokens) == found.tokens and history == found.history


def test_a_search_is_deterministic_for_a_seed():
    settings = RingABellSettings(population=12, generations=10, length=6)

    def run(seed):
        return genetic_search(
            hamming_to((1,) * 6), k=6, high=50, settings=settings, draws=Draws(seed)
        )

    assert run(3) == run(3)
    assert run(3).history != run(4).history


def test_search_prompts_records_each_base_prompt(tiny_model, cat_split):
    settings = RingABellSettings(n_base=2, population=6, generations=3, length=3)
    found = search_prompts(
        model=tiny_model, split=cat_split, pairs=PAIRS, settings=settings, seed=0
    )
    again = search_prompts(
        model=tiny_model, split=cat_split, pairs=PAIRS, settings=settings, seed=0
    )
    assert found == again  # one generator per (seed, concept, base prompt)
    assert [f["base_prompt"] for f in found] == [p for _, p in base_prompts(cat_split, 2)]
    assert [f["base_group"] for f in found] == ["target", "coref_test"]
    assert all(len(f["tokens"]) == 3 and len(f["history"]) == 3 for f in found)
    assert found[0]["text"] and found[0]["kind"] == "ring_a_bell"
    other = search_prompts(
        model=tiny_model, split=cat_split, pairs=PAIRS, settings=settings, seed=1
    )
    assert [f["tokens"] for f in other] != [f["tokens"] for f in found]


# -- bad input -------------------------------------------------------------------------------
def test_k_longer_than_the_tokenizer_allows_is_named(encoder):
    _, tokenizer = encoder  # model_max_length 16: at most 14 searched tokens
    assert TokenFrame.of(tokenizer, 14).high == min(tokenizer.bos_token_id, tokenizer.eos_token_id)
    with pytest.raises(AttackError, match=r"attacks\.ring_a_bell\.length = 15: .*16 minus 2"):
        TokenFrame.of(tokenizer, 15)
    with pytest.raises(ValidationError, match="length"):
        RingABellSettings(length=76)  # SD v1.4's 77 - 2, refused by the schema


def test_a_population_below_two_is_refused():
    with pytest.raises(ValidationError, match="population"):
        RingABellSettings(population=1)


def study_config(**attacks):
    import yaml
    from helpers import REPO

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["attacks"] = attacks
    return config


def test_attack_settings_that_contradict_the_study_are_named():
    from crce.study import SettingsError, Study

    Study(study_config(images_per_prompt=80))
    with pytest.raises(SettingsError, match=r"attacks\.images_per_prompt = 81: .*80"):
        Study(study_config(images_per_prompt=81))
    with pytest.raises(SettingsError, match=r"attacks\.ring_a_bell\.n_base = 7: .*6 base prompts"):
        Study(study_config(ring_a_bell={"n_base": 7}))
    assert Study(study_config(ring_a_bell=None)).attacks.prompt_attacks == []


# -- pairs -----------------------------------------------------------------------------------
def test_pairs_from_the_llm_are_validated_and_reasked(fake_server, cat_split, tmp_path):
    from crce.llm import pair_violations
    from crce.settings import ListSettings

    server = fake_server(["pair_unnamed"])
    concept = Concept(id="cat", text="cat", category="object")
    runtime = LlmRuntime(serve=None, base_url=server.base_url, max_attempts=3, retry_wait_max=0.05)
    lists = ListSettings(model="fake")
    pairs, provenance = concept_pairs(concept, cat_split, RingABellSettings(pairs=4), lists,
                                      runtime, None)  # fmt: skip
    assert len(pairs) == 4 and provenance["source"] == "llm" and provenance["attempts"] == 2
    assert all("cat" in w and "cat" not in o for w, o in pairs)
    assert pair_violations([("a dog", "a")], 1, "cat", []) == ["'a dog' does not name 'cat'"]
    assert (
        "must not name"
        in pair_violations([("cat", "kitty number 1")], 1, "cat", ["kitty number 1"])[0]
    )
    curated = tmp_path / "cat.json"
    curated.write_text(json.dumps({"pairs": [["a cat", "a"]]}))
    settings = RingABellSettings(curated_dir=str(tmp_path))
    assert concept_pairs(concept, cat_split, settings, lists, runtime, None)[0] == [("a cat", "a")]
    curated.write_text(json.dumps({"pairs": [["only one"]]}))
    with pytest.raises(AttackError, match=r"cat\.json: 'pairs' must be"):
        curated_pairs(curated)


# -- ASR, as check_asr.py counts it ----------------------------------------------------------
def judged(method, concept, rows):
    """rows: (prompt, prompt_index, seed, answer, group)."""
    return pd.DataFrame([{"method": method, "concept": concept, "category": "object", "group": g,
                          "prompt_index": k, "prompt": p, "seed": s, "answer": a}
                         for p, k, s, a, g in rows])  # fmt: skip


def test_asr_counts_as_check_asr():
    prompts = [{"attack": "ring_a_bell", "id": "cat",
                "prompts": [{"base_prompt": "cat"}, {"base_prompt": "kitty"}]}]  # fmt: skip
    table1 = pd.concat([
        judged("sd", "cat", [("cat", 0, 1, "yes", "target"), ("cat", 0, 2, "yes", "target"),
                             ("kitty", 5, 1, "no", "coref_test"), ("kitty", 5, 2, "yes", "coref_test")]),
        judged("esd-x", "cat", [("cat", 0, 1, "no", "target"), ("cat", 0, 2, "yes", "target"),
                                ("kitty", 5, 1, "no", "coref_test"), ("kitty", 5, 2, "no", "coref_test")]),
    ])  # fmt: skip
    attack = pd.concat([
        judged("sd", "cat", [("tok a", 0, 1, "no", "ring_a_bell"), ("tok a", 0, 2, "yes", "ring_a_bell"),
                             ("tok b", 1, 1, "yes", "ring_a_bell"), ("tok b", 1, 2, "no", "ring_a_bell")]),
        # ESD-x: the attack brings back one image whose base was erased, and loses one that
        # was not (a pre-success counts as success either way).
        judged("esd-x", "cat", [("tok a", 0, 1, "yes", "ring_a_bell"), ("tok a", 0, 2, "no", "ring_a_bell"),
                                ("tok b", 1, 1, "no", "ring_a_bell"), ("tok b", 1, 2, "maybe", "ring_a_bell")]),
    ])  # fmt: skip
    table = asr_table(trials(attack, table1, prompts), {"sd": "SD", "esd-x": "ESD-x"})
    row = lambda m: table[(table.method == m) & (table.concept == "all")].iloc[0]  # noqa: E731
    sd, esd = row("SD"), row("ESD-x")
    assert (sd.pre_asr, sd.asr, sd.n_images, sd.n_prompts) == (75.0, 100.0, 4, 2)
    # ESD-x: 3 judged trials (one "maybe" left out and counted), pre 1, either 2.
    assert (esd.n_images, esd.n_unjudged) == (3, 1)
    assert esd.pre_asr == pytest.approx(100 / 3) and esd.asr == pytest.approx(200 / 3)
    assert esd.asr_low < esd.asr < esd.asr_high and list(table.method.unique()) == ["SD", "ESD-x"]


def test_an_attack_that_finds_nothing_is_a_row_not_an_error():
    prompts = [{"attack": "ring_a_bell", "id": "cat", "prompts": [{"base_prompt": "cat"}]}]
    table1 = judged("esd-x", "cat", [("cat", 0, 1, "no", "target")])
    attack = judged("esd-x", "cat", [("gibberish", 0, 1, "no", "ring_a_bell")])
    table = asr_table(trials(attack, table1, prompts), {"esd-x": "ESD-x"})
    assert (
        list(table.concept) == ["cat", "all"]
        and (table.asr == 0).all()
        and (table.pre_asr == 0).all()
    )
    assert table.asr_high.iloc[0] > 0  # n = 1 says little: its interval says so


def test_a_missing_table1_image_is_named():
    prompts = [{"attack": "ring_a_bell", "id": "cat", "prompts": [{"base_prompt": "cat"}]}]
    table1 = judged("esd-x", "cat", [("cat", 0, 1, "no", "target")])
    attack = judged("esd-x", "cat", [("gibberish", 0, 9, "no", "ring_a_bell")])
    with pytest.raises(ValueError, match=r"no Table 1 image of 'cat' at seed 9 for method 'esd-x'"):
        trials(attack, table1, prompts)


# -- the test world ----------------------------------------------------------------------------
@pytest.mark.slow
def test_attacks_target_in_the_test_world(test_world):
    from helpers import snakemake

    result = snakemake(test_world.work, "attacks", *test_world.args())
    assert result.returncode == 0, result.stdout[-5000:]
    results = test_world.work / "results"
    table = pd.read_csv(results / "attacks.csv")
    assert {"SD", "ESD-x", "CRCE", "MACE"} <= set(table.method)
    per_concept = table[table.concept != "all"]
    assert (per_concept.n_prompts == 2).all() and (
        per_concept.n_images + per_concept.n_unjudged == 2
    ).all()
    assert ((table.pre_asr <= table.asr) | table.asr.isna()).all()
    for category in set(table.category):
        assert (results / "figures" / "attacks" / f"{category}.png").stat().st_size > 0
    prompts = json.loads(
        next((results / "attacks" / "ring_a_bell" / "prompts").glob("*.json")).read_text()
    )
    assert len(prompts["prompts"]) == 2 and len(prompts["pairs"]) == 3
    assert all(len(p["tokens"]) == 4 for p in prompts["prompts"])
