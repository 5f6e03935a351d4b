# The concept sheet, config validation, the resolved settings and every input function.
import re
import sys
from dataclasses import asdict
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

# This package is imported from the checkout, here and in every job (see jobs_import_from).
SRC = str(Path(workflow.basedir) / "src")
sys.path.insert(0, SRC)

from crce.concepts import SheetError, load_sheet
from crce.corefconcept import DatasetError, check_local_dataset, is_url
from crce.paper import PAPER_TABLE2
from crce.settings import (
    METRICS,
    TRAINER_VERSION,
    SettingsError,
    Study,
    is_iterative,
    jobs_import_from,
    untracked,
)

jobs_import_from(SRC)

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

METHODS = config["methods"]
TRAINED_METHODS = list(STUDY.trained)


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
    """The method's resolved training settings (train.* with its overrides), as builtins."""
    return {wildcards.method: STUDY.all_trained[wildcards.method].as_params()}


def group_settings(methods):
    return {m: STUDY.all_trained[m].as_params() for m in methods}


def iterative(method):
    return is_iterative(STUDY.all_trained[method])


def external_checkpoint(wildcards):
    """An external method's checkpoint for this concept, as an input once it exists."""
    settings = STUDY.all_trained[wildcards.method]
    if is_iterative(settings) or settings.strategy != "external":
        return []
    path = Path(settings.path.format(concept=wildcards.concept))
    return [str(path)] if path.exists() else []


def trained_delta(wildcards):
    """A trained method's delta; the `sd` baseline samples the base model."""
    if wildcards.method not in STUDY.all_trained:
        return []
    return [f"results/models/{wildcards.method}/{wildcards.concept}/delta.safetensors"]


def concept_manifests(wildcards):
    return [f"results/images/{m}/{wildcards.concept}/manifest.parquet" for m in METHODS]


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
    return [
        f"results/images/{m}/{wildcards.concept}/manifest.parquet" for m in SWEEP_ONLY
    ]


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
