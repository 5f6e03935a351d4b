# Erasure: one job per (method, concept), its resources from the method's kind (a GPU to
# train; a solve or a checkpoint read needs none); or (train.group_methods) one GPU job per
# concept that trains its group of methods in shared batches.


rule erase:
    input:
        split="results/splits/{concept}.json",
        model=base_model,
        # What the method's job reads beyond the split (an external checkpoint).
        extra=method_inputs,
        # The image sets it trains on (rule reference_images).
        references=reference_files(),
    output:
        delta="results/models/{method}/{concept}/delta.safetensors",
        record="results/models/{method}/{concept}/train.json",
    log:
        "logs/erase/{method}/{concept}.log",
    wildcard_constraints:
        method=one_of(STUDY.solo),
    retries: 2
    conda:
        "../../envs/train.yaml"
    resources:
        gpu=erase_resources("gpu"),
        runtime=lambda wildcards, attempt: STUDY.resources(wildcards.method)["minutes"]
        * attempt,
    params:
        settings=erase_settings,
        # A method in your own file: its source digest (editing it reruns its jobs).
        sources=erase_sources,
        model=STUDY.model,
        seed=STUDY.seed,
        # A new trainer version reruns training even with an unchanged config.
        trainer_version=TRAINER_VERSION,
        runtime=untracked(STUDY.train_runtime),
        # Not an output: Snakemake deletes a failed job's outputs, checkpoints must survive.
        checkpoint_dir="results/.checkpoints/{method}/{concept}",
        # Each method's delta by name (derived from the outputs: no rerun trigger).
        outputs=lambda wildcards, output: {wildcards.method: output.delta},
        references=reference_latents(),
    script:
        "../scripts/erase.py"


if STUDY.grouped:

    rule erase_group:
        input:
            split="results/splits/{concept}.json",
            model=base_model,
            references=reference_files(STUDY.grouped),
        output:
            **delta_outputs(STUDY.grouped),
        log:
            "logs/erase/group/{concept}.log",
        retries: 2
        conda:
            "../../envs/train.yaml"
        resources:
            gpu=1,
            runtime=lambda wildcards, attempt: 120 * attempt,
        params:
            settings=STUDY.erase_params(STUDY.grouped),
            sources=STUDY.sources(STUDY.grouped),
            model=STUDY.model,
            seed=STUDY.seed,
            trainer_version=TRAINER_VERSION,
            runtime=untracked(STUDY.train_runtime),
            checkpoint_dir="results/.checkpoints/group/{concept}",
            outputs=lambda wildcards, output: {m: output[m] for m in STUDY.grouped},
            references=reference_latents(STUDY.grouped),
        script:
            "../scripts/erase.py"


# Paper Table 6's own cells (a cell equal to a Table 1 method is that method's job).
if STUDY.sweep_grouped:

    use rule erase_group as erase_sweep with:
        input:
            split="results/splits/{concept}.json",
            model=base_model,
            references=reference_files(STUDY.sweep_grouped),
        output:
            **delta_outputs(STUDY.sweep_grouped),
        log:
            "logs/erase/sweep/{concept}.log",
        wildcard_constraints:
            concept=one_of(SWEEP_CONCEPTS),
        resources:
            gpu=1,
            runtime=lambda wildcards, attempt: 240 * attempt,
        params:
            settings=STUDY.erase_params(STUDY.sweep_grouped),
            sources=STUDY.sources(STUDY.sweep_grouped),
            model=STUDY.model,
            seed=STUDY.seed,
            trainer_version=TRAINER_VERSION,
            runtime=untracked(STUDY.train_runtime),
            checkpoint_dir="results/.checkpoints/sweep/{concept}",
            outputs=lambda wildcards, output: {
                m: output[m] for m in STUDY.sweep_grouped
            },
            references=reference_latents(STUDY.sweep_grouped),


# MACE's preservation caches (crce.methods.mace): each caption file fetched on the login node,
# then its gram under the base model's text encoder, once for every concept that reads it.
if MACE_CACHES:

    rule mace_prompts:
        output:
            "results/mace/prompts-{key}.csv",
        log:
            "logs/mace/prompts-{key}.log",
        wildcard_constraints:
            key=one_of(MACE_CACHES),
        localrule: True
        conda:
            "../../envs/llm.yaml"
        params:
            source=lambda wildcards: MACE_CACHES[wildcards.key]["prompts"],
            sha256=lambda wildcards: MACE_CACHES[wildcards.key]["sha256"],
            what="mace prompts",
        script:
            "../scripts/quality_prompts.py"

    rule mace_cache:
        input:
            prompts="results/mace/prompts-{key}.csv",
            model=base_model,
        output:
            "results/mace/cache-{key}.safetensors",
        log:
            "logs/mace/cache-{key}.log",
        wildcard_constraints:
            key=one_of(MACE_CACHES),
        conda:
            "../../envs/train.yaml"
        resources:
            gpu=1,
            runtime=60,
        params:
            model=STUDY.model,
            runtime=untracked(STUDY.train_runtime),
        script:
            "../scripts/mace_cache.py"
