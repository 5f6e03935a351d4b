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

from crce.attacks import AttackError
from crce.attacks.asr import asr_table, trials
from crce.attacks.pairs import concept_pairs, curated_pairs
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


def test_the_papers_attacks_plan_one_search_per_concept(workdir):
    """Ring-A-Bell is model-agnostic: 50 searches (and 50 pair requests), then every method
    samples each concept's found prompts: 9 x 50, judged per concept."""
    from helpers import planned, snakemake

    result = snakemake(workdir, "-n", "attacks")
    assert result.returncode == 0, result.stdout[-3000:]
    counts = planned(result.stdout)
    assert (counts["ring_a_bell_pairs"], counts["ring_a_bell"]) == (50, 50)
    assert (counts["sample_attack"], counts["judge_attack"]) == (450, 50)
    assert counts["attack_table"] == 1 and counts["attack_figure"] == 3
    (workdir / "many.yaml").write_text("attacks:\n  images_per_prompt: 81\n")
    refused = snakemake(workdir, "-n", "attacks", "--configfile", "many.yaml")
    assert (
        refused.returncode != 0 and "bad config: attacks.images_per_prompt = 81" in refused.stdout
    )
    (workdir / "uda.yaml").write_text("attacks:\n  unlearndiffatk:\n    concepts: [celebrity]\n")
    uda = planned(snakemake(workdir, "-n", "attacks", "--configfile", "uda.yaml").stdout)
    # The paper's 8 erasing methods on its 15 celebrities; one judge job per celebrity.
    assert (uda["unlearndiffatk"], uda["judge_uda"], uda["sample_attack"]) == (120, 15, 450)
    (workdir / "typo.yaml").write_text("attacks:\n  unlearndiffatk:\n    concepts: [celebrty]\n")
    refused = snakemake(workdir, "-n", "attacks", "--configfile", "typo.yaml")
    assert "bad config: attacks.unlearndiffatk.concepts: 'celebrty' is neither" in refused.stdout


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
    assert (sd.pre_asr, sd.asr, sd.n_trials, sd.n_images, sd.n_prompts) == (75.0, 100.0, 4, 4, 2)
    # ESD-x: 3 judged trials (one "maybe" left out and counted), pre 1, either 2.
    assert (esd.n_trials, esd.n_unjudged) == (3, 1)
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
    """`snakemake attacks`: Ring-A-Bell for every method and concept, UnlearnDiffAtk on cat
    for ESD-x and CRCE (config/test.yaml), in one table with a figure per category."""
    from helpers import snakemake

    result = snakemake(test_world.work, "attacks", *test_world.args())
    assert result.returncode == 0, result.stdout[-5000:]
    results = test_world.work / "results"
    table = pd.read_csv(results / "attacks.csv")
    ring = table[(table.attack == "ring_a_bell") & (table.concept != "all")]
    assert {"SD", "ESD-x", "CRCE", "MACE"} <= set(ring.method)
    assert (ring.n_prompts == 2).all() and (ring.n_trials + ring.n_unjudged == 2).all()
    assert ((table.pre_asr <= table.asr) | table.asr.isna()).all()
    uda = table[(table.attack == "unlearndiffatk") & (table.concept == "cat")]
    assert sorted(uda.method) == ["CRCE", "ESD-x"] and (uda.n_prompts == 1).all()
    units = json.loads((results / "attacks/unlearndiffatk/units/esd-x/cat.json").read_text())
    unit = units["units"][0]
    assert unit["pre_success"] or [r["t"] for r in unit["rounds"]] == [250, 750]
    for category in set(table.category):
        assert (results / "figures" / "attacks" / f"{category}.png").stat().st_size > 0
    prompts = json.loads((results / "attacks/ring_a_bell/prompts/cat.json").read_text())
    assert len(prompts["prompts"]) == 2 and len(prompts["pairs"]) == 3
    assert all(len(p["tokens"]) == 4 for p in prompts["prompts"])
    report = snakemake(test_world.work, "--report", "attacks.html", "attacks", *test_world.args())
    assert report.returncode == 0, report.stdout[-3000:]
    html = (test_world.work / "attacks.html").read_text(errors="replace")
    assert "attacks.csv" in html and "object.png" in html


# -- UnlearnDiffAtk ----------------------------------------------------------------------------
def test_the_timesteps_walk_the_schedule_as_classifier_py():
    from crce.attacks.unlearndiffatk import sampled_timesteps

    assert sampled_timesteps(50) == list(range(10, 1000, 20)) and len(sampled_timesteps(50)) == 50
    assert sampled_timesteps(2) == [250, 750]


def test_the_simplex_projection_is_the_official_bisection():
    import reference_unlearndiffatk as uda

    from crce.attacks.unlearndiffatk import projection

    rows = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 0.3 + 0.02
    mine = projection(rows)
    np.testing.assert_array_equal(mine.numpy(), uda.projection(rows[None])[0].numpy())
    assert torch.allclose(mine.sum(-1), torch.ones(3), atol=1e-4) and (mine >= 0).all()
    uniform = torch.full((2, 10), 0.1)
    assert torch.equal(projection(uniform), uniform)  # already on the simplex: kept


@pytest.fixture(scope="module")
def tiny_pipe(tiny_model):
    from crce.modeling import load_pipeline

    pipe = load_pipeline(tiny_model)
    for part in (pipe.unet, pipe.text_encoder, pipe.vae):
        part.requires_grad_(False).eval()
    return pipe


def test_unlearndiffatk_follows_the_official_loop(tiny_pipe, tmp_path):
    """The same draws: every round's prompt and summed loss, and the final distributions,
    equal the official TextGrad loop's (prefix_k, sequential)."""
    import reference_unlearndiffatk as uda
    from PIL import Image

    from crce.attacks.unlearndiffatk import Attack, latent_of, sampled_timesteps
    from crce.settings import UnlearnDiffAtkSettings

    image = tmp_path / "x.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(image)
    x0 = latent_of(tiny_pipe.vae, str(image), "cpu")
    settings = UnlearnDiffAtkSettings(iterations=3, timesteps=2)
    mine = Attack(unet=tiny_pipe.unet, text_encoder=tiny_pipe.text_encoder,
                  tokenizer=tiny_pipe.tokenizer, alphas_cumprod=tiny_pipe.scheduler.alphas_cumprod,
                  x0=x0, prompt="a cat", k=2, settings=settings,
                  generator=torch.Generator().manual_seed(5))  # fmt: skip
    rounds = mine.run()
    theirs, dist = uda.attack(
        unet=tiny_pipe.unet, text_encoder=tiny_pipe.text_encoder, tokenizer=tiny_pipe.tokenizer,
        alphas_cumprod=tiny_pipe.scheduler.alphas_cumprod, x0=x0, prompt="a cat", k=2,
        iterations=3, sampled_t=sampled_timesteps(2), lr=0.01, weight_decay=0.1,
        generator=torch.Generator().manual_seed(5),
    )  # fmt: skip
    assert [(r["t"], r["prompt"]) for r in rounds] == [(t, p) for t, p, _ in theirs]
    np.testing.assert_allclose(
        [r["loss"] for r in rounds], [loss for *_, loss in theirs], rtol=1e-5
    )
    np.testing.assert_allclose(mine.dist.detach().numpy(), dist.numpy(), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(dist, torch.full_like(dist, 1 / dist.shape[-1]))  # it moved
    assert all(r["prompt"].endswith("cat") and len(r["tokens"]) == 2 for r in rounds)


def test_a_prompt_and_prefix_longer_than_the_tokenizer_is_named(tiny_pipe):
    from crce.attacks.unlearndiffatk import prompt_parts

    ids, length = prompt_parts(tiny_pipe.tokenizer, "a cat", 3)
    assert length == len(tiny_pipe.tokenizer("a cat", add_special_tokens=False).input_ids)
    with pytest.raises(AttackError, match=r"prefix of 14 do not fit .*attacks\.unlearndiffatk\.k"):
        prompt_parts(tiny_pipe.tokenizer, "a cat", 14)


def test_attack_units_are_the_prompts_the_base_model_draws_as_the_target(cat_split):
    from crce.attacks.unlearndiffatk import attack_units

    test_coref = cat_split.coref_test[0].text
    judged = pd.DataFrame([
        {"prompt": "cat", "image_index": 0, "seed": 10, "answer": "no", "path": "a"},
        {"prompt": "cat", "image_index": 1, "seed": 11, "answer": "yes", "path": "b"},
        {"prompt": "cat", "image_index": 5, "seed": 15, "answer": "yes", "path": "c"},  # past images
        {"prompt": test_coref, "image_index": 0, "seed": 20, "answer": "yes", "path": "d"},
        {"prompt": cat_split.coref_train[0].text, "image_index": 0, "seed": 30, "answer": "yes", "path": "e"},
    ])  # fmt: skip
    units = attack_units(cat_split, judged, images=2, n=5)
    assert [(u["base_prompt"], u["seed"]) for u in units] == [("cat", 11), (test_coref, 20)]
    assert [u["base_group"] for u in units] == ["target", "coref_test"]
    assert len(attack_units(cat_split, judged, images=2, n=1)) == 1


def test_a_unit_succeeds_if_any_round_does_and_a_skipped_one_by_its_pre_success():
    from crce.attacks.asr import unit_trials

    files = [{"attack": "unlearndiffatk", "method": "esd-x", "id": "cat", "category": "object",
              "units": [{"base_prompt": "cat", "seed": 1, "rounds": [{}, {}]},
                        {"base_prompt": "cat", "seed": 2, "rounds": [{}, {}]},
                        {"base_prompt": "cat", "seed": 3, "rounds": []}]}]  # fmt: skip
    table1 = judged("esd-x", "cat", [("cat", 0, 1, "no", "target"), ("cat", 0, 2, "no", "target"),
                                     ("cat", 0, 3, "yes", "target")])  # fmt: skip
    attack = judged("esd-x", "cat", [("p0", 0, 1, "no", "unlearndiffatk"), ("p1", 0, 1, "yes", "unlearndiffatk"),
                                     ("q0", 1, 2, "no", "unlearndiffatk"), ("q1", 1, 2, "no", "unlearndiffatk")])  # fmt: skip
    frame = unit_trials(attack, table1, files)
    assert list(frame.success) == [True, False, False] and list(frame.pre) == [False, False, True]
    row = asr_table(frame, {"esd-x": "ESD-x"}).iloc[-1]
    assert (row.n_trials, row.n_images, row.pre_asr) == (3, 4, pytest.approx(100 / 3))
    assert row.asr == pytest.approx(200 / 3)  # the round that worked, and the skipped pre-success


def test_unlearndiffatk_subsets_name_what_is_wrong():
    from crce.concepts import Concept as C
    from crce.study import SettingsError, Study

    sheet = {"cat": C(id="cat", text="cat", category="object"),
             "beyonce": C(id="beyonce", text="Beyoncé", category="celebrity")}  # fmt: skip
    study = Study(study_config(unlearndiffatk={"concepts": ["celebrity", "cat"]}))
    assert study.uda_concepts(sheet) == ["beyonce", "cat"]
    assert "sd" not in study.uda_methods() and "esd-x" in study.uda_methods()
    wrong = Study(study_config(unlearndiffatk={"concepts": ["dog"]}))
    with pytest.raises(SettingsError, match=r"attacks\.unlearndiffatk\.concepts: 'dog' is neither"):
        wrong.uda_concepts(sheet)
    with pytest.raises(
        SettingsError, match=r"attacks\.unlearndiffatk\.methods: esd-y not in methods"
    ):
        Study(study_config(unlearndiffatk={"methods": ["esd-y"]}))


def test_the_straight_through_draw_clips_its_gradient():
    import reference_unlearndiffatk as uda

    from crce.attacks.unlearndiffatk import StraightThroughDraw

    dist = torch.full((2, 6), 1 / 6, requires_grad=True)
    one_hot = StraightThroughDraw.apply(dist, torch.Generator().manual_seed(1))
    assert torch.equal(one_hot.sum(-1), torch.ones(2))
    theirs = uda.STERandSelect.apply(dist[None], torch.Generator().manual_seed(1))[0]
    assert torch.equal(one_hot, theirs)  # the same token drawn from the same generator
    weights = torch.linspace(-5, 5, 12).view(2, 6)
    (one_hot * weights).sum().backward()
    assert torch.equal(dist.grad, weights.clamp(-1, 1))  # hardtanh, then straight through


def test_an_attack_job_skips_what_the_method_draws_and_resumes_its_pairs(
    tiny_model, cat_split, tmp_path, caplog
):
    """run_attack on the tiny model: the pair the method already draws as the target is a
    pre-success and not attacked; the other is attacked and every round drawn; a second run
    reads the attacked pair's rounds instead of attacking again."""
    import logging

    from PIL import Image

    from crce.attacks.unlearndiffatk import run_attack
    from crce.lists import write_model
    from crce.settings import SampleSettings

    split = tmp_path / "cat.json"
    write_model(cat_split, split)
    images = []
    for i in range(2):
        images.append(tmp_path / f"sd{i}.png")
        Image.fromarray(np.full((32, 32, 3), 60 * i, dtype=np.uint8)).save(images[-1])
    base = pd.DataFrame([{"prompt": "cat", "image_index": i, "seed": 100 + i, "answer": "yes",
                          "path": str(images[i])} for i in range(2)])  # fmt: skip
    base.to_parquet(tmp_path / "sd.parquet")
    base.assign(answer=["yes", "no"]).to_parquet(
        tmp_path / "mine.parquet"
    )  # seed 100 already drawn
    kwargs = dict(
        split_path=str(split), base_judgments=str(tmp_path / "sd.parquet"),
        judgments=str(tmp_path / "mine.parquet"), method="esd-x", category="object", seed=0,
        settings={"n_prompts": 2, "iterations": 2, "timesteps": 2}, images=2, model=tiny_model,
        delta=None, sample=SampleSettings(steps=2, resolution=32, precision="float32").as_params(),
        runtime={"batch_size": 4, "device": "cpu"}, output=str(tmp_path / "units" / "cat.json"),
        manifest=str(tmp_path / "images" / "manifest.parquet"),
    )  # fmt: skip
    run_attack(**kwargs)
    units = json.loads((tmp_path / "units" / "cat.json").read_text())["units"]
    assert [u["pre_success"] for u in units] == [True, False]
    assert units[0]["rounds"] == [] and [r["t"] for r in units[1]["rounds"]] == [250, 750]
    manifest = pd.read_parquet(tmp_path / "images" / "manifest.parquet")
    assert list(manifest.prompt_index) == [1, 1] and (manifest.seed == 101).all()
    assert list(manifest.prompt) == [r["prompt"] for r in units[1]["rounds"]]
    with caplog.at_level(logging.INFO, logger="crce.attacks.unlearndiffatk"):
        run_attack(**kwargs)
    assert "rounds read from" in caplog.text
    assert json.loads((tmp_path / "units" / "cat.json").read_text())["units"] == units
