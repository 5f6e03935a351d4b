# Evaluation images: 31 prompts x sample.images_per_prompt per method and concept.


rule sample:
    input:
        split="results/splits/{concept}.json",
        delta=trained_delta,
        model=base_model,
        # The split, for a method whose sampling reads it (SLD with its corefs).
        extra=sampling_inputs,
    output:
        "results/images/{method}/{concept}/manifest.parquet",
    log:
        "logs/sample/{method}/{concept}.log",
    retries: 2
    conda:
        "../../envs/sample.yaml"
    resources:
        gpu=1,
        runtime=lambda wildcards, attempt: 120 * attempt,
    params:
        settings=STUDY.sample.as_params(),
        model=STUDY.model,
        seed=STUDY.seed,
        # A method's per-prompt sampling hook (tracked only for a method that has one).
        sampling=sampling,
        runtime=untracked(STUDY.sample_runtime),
    script:
        "../scripts/sample.py"


# The images a method trains on (its `references()`), from the base model: one job per set,
# however many methods and concepts ask for it (crce.references).
rule reference_images:
    input:
        model=base_model,
        split=reference_split,
        anchor=reference_anchor,
        # The mask models a set with masks loads, when the workflow builds them.
        masks=reference_mask_models,
    output:
        manifest="results/references/{key}/manifest.parquet",
        latents="results/references/{key}/latents.safetensors",
    log:
        "logs/references/{key}.log",
    wildcard_constraints:
        key=one_of(REFERENCES),
    retries: 2
    conda:
        "../../envs/sample.yaml"
    resources:
        gpu=1,
        runtime=lambda wildcards, attempt: 120 * attempt,
    params:
        request=lambda wildcards: REFERENCES[wildcards.key],
        runtime=untracked(STUDY.sample_runtime),
    script:
        "../scripts/reference_images.py"


# MACE's mask models, when the workflow builds them (the test world's tiny GroundingDINO
# and SAM) instead of downloading them.
if MASK_BUILDS:

    rule mask_models:
        output:
            detector=directory(list(MASK_BUILDS.values())[0][0]),
            sam=directory(list(MASK_BUILDS.values())[0][1]),
        log:
            "logs/mask_models.log",
        conda:
            "../../envs/sample.yaml"
        params:
            build=list(MASK_BUILDS)[0],
            seed=STUDY.seed,
        script:
            "../scripts/mask_models.py"


# On demand only (a full pipeline per (method, concept): terabytes at paper scale):
# `snakemake results/export/crce/cat` writes a folder StableDiffusionPipeline loads.
rule export:
    input:
        delta=trained_delta,
        model=base_model,
        extra=sampling_inputs,
    output:
        directory("results/export/{method}/{concept}"),
    log:
        "logs/export/{method}/{concept}.log",
    conda:
        "../../envs/sample.yaml"
    params:
        model=STUDY.model,
        settings=STUDY.sample.as_params(),
        sampling=sampling,
    script:
        "../scripts/export.py"
