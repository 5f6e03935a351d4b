# The concept sheet, config validation, the resolved settings and every input function.
import os
import re
import sys
from dataclasses import asdict
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.settings.types import ExecMode
from snakemake.utils import validate

# This package is imported from the checkout, here and in every job; a method in your own file
# (`strategy: my_lab.methods:Mine`) from the workflow's directory.
SRC = str(Path(workflow.basedir) / "src")
WORKDIR = os.getcwd()
sys.path[:0] = [SRC, WORKDIR]


from crce.concepts import SheetError, load_sheet
from crce.constants import METRICS, TRAINER_VERSION
from crce.corefconcept import DatasetError, check_local_dataset, is_url
from crce.files import stale
from crce.methods.mace import mask_models as mace_mask_models
from crce.methods.mace import cache_sources as mace_cache_sources
from crce.jobs import (
    conda_missing,
    hand_parent_to_jobs,
    jobs_import_from,
    untracked,
    writable_or_error,
)
from crce.paper import PAPER_TABLE2
from crce.study import SettingsError, Study, drop_left_out_methods

jobs_import_from(SRC, WORKDIR)
hand_parent_to_jobs()  # a job ends with this Snakemake (crce.jobs.watch_parent)

for problem in (
    writable_or_error("results"),
    conda_missing(workflow.deployment_settings.deployment_method, sys.argv[1:]),
):
    if problem:
        raise WorkflowError(problem)

drop_left_out_methods(config)  # `methods: {name: null}` in an overlay leaves it out
validate(config, schema="../schemas/config.schema.yaml")

try:
    CONCEPTS = {c.id: c for c in load_sheet(config["concepts"])}
except SheetError as err:
    raise WorkflowError(f"bad concept sheet: {err}") from None

# Every setting resolved once; each job gets exactly its own (README: what reruns when).
try:
    STUDY = Study(config)
except SettingsError as err:
    raise WorkflowError(f"bad config: {err}") from None

CATEGORIES = sorted({c.category for c in CONCEPTS.values()})
DATASET = STUDY.lists.dataset
try:
    check_local_dataset(DATASET, CONCEPTS.values())
except DatasetError as err:
    raise WorkflowError(str(err)) from None

METHODS = list(STUDY.methods)
TRAINED_METHODS = list(STUDY.trained)
# UnlearnDiffAtk attacks each (method, concept) of these (opt-in: `attacks.unlearndiffatk`).
try:
    UDA_CONCEPTS = STUDY.uda_concepts(CONCEPTS)
except SettingsError as err:
    raise WorkflowError(f"bad config: {err}") from None
UDA_METHODS = STUDY.uda_methods() if UDA_CONCEPTS else []


def table1_links():
    """(product, the delta it was drawn from) along Table 1's chain: a trained method's images,
    and their judgments."""
    for m in TRAINED_METHODS:
        for c in CONCEPTS:
            delta = f"results/models/{m}/{c}/delta.safetensors"
            yield f"results/images/{m}/{c}/manifest.parquet", delta
            yield f"results/judgments/{m}/{c}.parquet", delta


# Snakemake compares mtimes and does not remake a missing file whose products are up to
# date, so images or a table drawn from another delta than the one there now (restored with
# an old mtime; rebuilt after a failed job left the old products) would pass for current.
# Every product records its delta's digest (crce.files.record_sources): refuse such a product,
# naming how to rebuild it (only in the invocation the user typed).
STALE = [
    (made, delta)
    for made, delta in table1_links()
    if made not in sys.argv and stale(made, delta)
]
if STALE and workflow.exec_mode == ExecMode.DEFAULT:
    made, delta = STALE[0]
    raise WorkflowError(
        f"{made} was made from another {delta} than the one there now: it and what was made "
        f"from it are not current ({len(STALE)} such file(s)). Rerun the same command with "
        "--forcerun " + " ".join(m for m, _ in STALE)
    )


wildcard_constraints:
    concept=r"[a-z0-9][a-z0-9_-]*",
    method=r"[a-z0-9][a-z0-9_-]*",


def one_of(names):
    """A wildcard constraint matching exactly these names (none: a pattern nothing matches)."""
    return "|".join(re.escape(n) for n in names) or "(?!)"


def concept_row(wildcards):
    """The sheet row, passed as a param: a per-concept rule never takes the sheet as input."""
    return asdict(CONCEPTS[wildcards.concept])


def curated_lists(wildcards):
    curated_dir = STUDY.lists.curated_dir
    path = Path(curated_dir or "", f"{wildcards.concept}.json")
    return [str(path)] if curated_dir and path.is_file() else []


def dataset_file(category):
    """The CorefConcept file of a category: fetched by the `download` target when the dataset
    is a URL, read in place from a local folder, none without a dataset."""
    if not DATASET:
        return []
    if is_url(DATASET):
        return [f"results/corefconcept/{category}.json"]
    return [str(Path(DATASET, f"{category}.json"))]


def concept_dataset_file(wildcards):
    return dataset_file(CONCEPTS[wildcards.concept].category)


def all_dataset_files():
    return [f for category in CATEGORIES for f in dataset_file(category)]


def base_model(wildcards=None):
    """The base model folder when the workflow builds it (tiny/toy worlds), else nothing."""
    return [STUDY.model] if STUDY.model_build else []


def download_repos():
    """Hub repos the jobs load: the base model (unless built here), a served judge, and the
    CLIP model of the quality and audit targets (unless built here or the toy's)."""
    repos = [None if STUDY.model_build else STUDY.model]
    repos.append(STUDY.judge.model if STUDY.judge_runtime.serve else None)
    clip = STUDY.features.kind == "clip" and not STUDY.features_build
    repos.append(STUDY.features.pretrained if clip else None)
    repos += MASK_MODELS.get("download", [])  # MACE's GroundingDINO and SAM
    return [r for r in repos if r]


def feature_model(wildcards=None):
    """The embedding model folder when the workflow builds it (test world), else nothing."""
    return [STUDY.features.pretrained] if STUDY.features_build else []


def audit_inputs(wildcards):
    """The audit's second opinion reads the concept's judgments (CLIP) or only its split
    (labelled renders, asked of the judge itself)."""
    inputs = {"split": f"results/splits/{wildcards.concept}.json"}
    if STUDY.audit.second_judge == "clip":
        inputs["judgments"] = [
            f"results/judgments/{m}/{wildcards.concept}.parquet" for m in METHODS
        ]
        inputs["model"] = feature_model()
    return inputs


def all_features():
    return expand(
        "results/quality/features/{method}/{concept}.parquet",
        method=METHODS,
        concept=CONCEPTS,
    )


def erase_settings(wildcards):
    """The method's resolved settings (its section's keys with its overrides), as builtins."""
    return STUDY.erase_params([wildcards.method])


def erase_sources(wildcards):
    """The source digest of a method defined in your own file (untracked for a built-in)."""
    return STUDY.sources([wildcards.method])


def erase_resources(key):
    """A kind's erase resources (crce.methods.KIND_RESOURCES): GPU and minutes per attempt."""
    return lambda wildcards: STUDY.resources(wildcards.method)[key]


def method_inputs(wildcards):
    """Files a method's erase job reads beyond the split (an external checkpoint, once it
    exists: a new one reruns the job)."""
    method = STUDY.all_trained[wildcards.method]
    return method.cls.job_inputs(method.settings, wildcards.concept)


# MACE's preservation caches (crce.methods.mace), by key: one per caption file (rule
# mace_cache): the prior's (MS-COCO) and each category's domain captions.
MACE_CACHES = mace_cache_sources([m.settings for m in STUDY.all_trained.values()])
# Its mask models: hub ids for `download`, or folders a builder writes (rule mask_models).
MASK_MODELS = mace_mask_models([m.settings for m in STUDY.all_trained.values()])
MASK_BUILDS = {b: folders for b, folders in MASK_MODELS.items() if b != "download"}
if len(MASK_BUILDS) > 1 or any(len(f) != 2 for f in MASK_BUILDS.values()):
    raise WorkflowError(
        "bad config: one `mask_models_build` with one detector and one SAM folder is "
        f"supported; the methods give {MASK_BUILDS}"
    )


def reference_mask_models(wildcards):
    """The built mask models a set's segmentation loads (a `gsam` request), if any."""
    spec = REFERENCES[wildcards.key].get("masks") or {}
    built = [f for folders in MASK_BUILDS.values() for f in folders]
    return [m for m in (spec.get("detector"), spec.get("sam")) if m in built]


# Every image set a method trains on, by key: each drawn once (rule reference_images).
REFERENCES = STUDY.reference_requests([asdict(c) for c in CONCEPTS.values()])


def reference_split(wildcards):
    """The split a set's prompts come from (a method's `from_split` request), if any."""
    from crce.references import split_file

    return split_file(REFERENCES[wildcards.key]) or []


def reference_anchor(wildcards):
    """The LLM's anchor a set reads (a method with `anchors: llm`), if any."""
    from crce.references import anchor_file

    return anchor_file(REFERENCES[wildcards.key]) or []


def reference_latents(methods=None):
    """An erase job's image sets (its methods' `references()`): name -> latents file; the
    job's own method when `methods` is None."""

    def of(wildcards):
        names = [wildcards.method] if methods is None else methods
        sets = STUDY.reference_sets(names, asdict(CONCEPTS[wildcards.concept]))
        return {
            n: f"results/references/{key}/latents.safetensors"
            for n, key in sets.items()
        }

    return of


def reference_files(methods=None):
    """The latents files an erase job waits for."""
    return lambda wildcards: list(reference_latents(methods)(wildcards).values())


def delta_outputs(methods):
    """An erase job's outputs, named: each method's delta under its name, its record beside."""
    outputs = {}
    for m in methods:
        outputs[m] = f"results/models/{m}/{{concept}}/delta.safetensors"
        outputs[f"{m}_record"] = f"results/models/{m}/{{concept}}/train.json"
    return outputs


def trained_delta(wildcards):
    """A trained method's delta; the `sd` baseline samples the base model."""
    if wildcards.method not in STUDY.all_trained:
        return []
    return [f"results/models/{wildcards.method}/{wildcards.concept}/delta.safetensors"]


def sampling(wildcards):
    """What a method changes at sampling time, when it does (untracked otherwise)."""
    return STUDY.sampling(wildcards.method, asdict(CONCEPTS[wildcards.concept]))


def sampling_inputs(wildcards):
    """The split, for a method whose sampling reads it (SLD with its corefs)."""
    return STUDY.sampling_inputs(wildcards.method, wildcards.concept)


def concept_manifests(wildcards):
    """Every method's images of the concept, by method."""
    return {
        m: f"results/images/{m}/{wildcards.concept}/manifest.parquet" for m in METHODS
    }


def judgments_of(methods, folder="judgments"):
    """A judge job's outputs, by method."""
    return {m: f"results/{folder}/{m}/{{concept}}.parquet" for m in methods}


def all_corefs():
    return expand("results/corefs/{concept}.json", concept=CONCEPTS)


def all_splits():
    return expand("results/splits/{concept}.json", concept=CONCEPTS)


def all_models():
    return expand(
        "results/models/{method}/{concept}/delta.safetensors",
        method=TRAINED_METHODS,
        concept=CONCEPTS,
    )


def all_manifests():
    return expand(
        "results/images/{method}/{concept}/manifest.parquet",
        method=METHODS,
        concept=CONCEPTS,
    )


def all_judgments():
    return expand(
        "results/judgments/{method}/{concept}.parquet", method=METHODS, concept=CONCEPTS
    )


def all_clip_distances():
    """Table 2 for every concept, and beside the paper's for the concepts it printed (dog)."""
    versus = [c.id for c in CONCEPTS.values() if c.text.casefold() in PAPER_TABLE2]
    return expand("results/clip_distances/{concept}.csv", concept=CONCEPTS) + expand(
        "results/table2_vs_paper/{concept}.csv", concept=versus
    )


# Paper Table 6: the sweep's concepts and cells (a cell equal to a Table 1 method is that one).
SWEEP_CONCEPTS = [
    c.id for c in CONCEPTS.values() if c.category in STUDY.sweep.categories
]
SWEEP_ONLY = list(STUDY.sweep.trained)


def sweep_manifests(wildcards):
    return {
        m: f"results/images/{m}/{wildcards.concept}/manifest.parquet"
        for m in SWEEP_ONLY
    }


def sweep_judgments():
    """Every cell's judgments: the sweep's own, and Table 1's for a reused method."""
    return [
        f"results/{'judgments' if m in METHODS else 'judgments-sweep'}/{m}/{c}.parquet"
        for m in STUDY.sweep.cells.values()
        for c in SWEEP_CONCEPTS
    ]


def table6_figures():
    return expand("results/figures/table6/{metric}.png", metric=METRICS.values())


def all_figures():
    return expand("results/figures/grids/{concept}.png", concept=CONCEPTS) + expand(
        "results/figures/bars/{category}.png", category=CATEGORIES
    )


def all_attack_prompts():
    """Each prompt attack's prompts of every concept (model-agnostic: one file per concept)."""
    return expand(
        "results/attacks/{attack}/prompts/{concept}.json",
        attack=STUDY.attacks.prompt_attacks,
        concept=CONCEPTS,
    )


def all_attack_judgments():
    return expand(
        "results/attacks/{attack}/judgments/{method}/{concept}.parquet",
        attack=STUDY.attacks.prompt_attacks,
        method=METHODS,
        concept=CONCEPTS,
    )


def all_uda_units():
    """UnlearnDiffAtk's attacked prompts of each (method, concept) it attacks."""
    return expand(
        "results/attacks/unlearndiffatk/units/{method}/{concept}.json",
        method=UDA_METHODS,
        concept=UDA_CONCEPTS,
    )


def all_uda_judgments():
    return expand(
        "results/attacks/unlearndiffatk/judgments/{method}/{concept}.parquet",
        method=UDA_METHODS,
        concept=UDA_CONCEPTS,
    )


def attack_figures():
    return expand("results/figures/attacks/{category}.png", category=CATEGORIES)
