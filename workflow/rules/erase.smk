# Erasure fine-tuning: one GPU job per trained method and concept, or (train.group_methods)
# one job per concept that trains its group of methods in shared batches.


rule erase:
    input:
        split="results/splits/{concept}.json",
        model=base_model,
        # An external method's checkpoint, once it exists (a new one reruns the job).
        checkpoint=external_checkpoint,
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
        # UCE solves in seconds and an external checkpoint is only read: no GPU for them.
        gpu=lambda wildcards: 1 if iterative(wildcards.method) else 0,
        runtime=lambda wildcards, attempt: (60 if iterative(wildcards.method) else 15)
        * attempt,
    params:
        concept=concept_row,
        settings=erase_settings,
        model=STUDY.model,
        seed=STUDY.seed,
        # A new trainer version reruns training even with an unchanged config.
        trainer_version=TRAINER_VERSION,
        runtime=untracked(STUDY.train_runtime),
        # Not an output: Snakemake deletes a failed job's outputs, checkpoints must survive.
        checkpoint_dir="results/.checkpoints/{method}/{concept}",
    script:
        "../scripts/erase.py"


if STUDY.grouped:

    rule erase_group:
        input:
            split="results/splits/{concept}.json",
            model=base_model,
        output:
            delta=expand(
                "results/models/{method}/{{concept}}/delta.safetensors",
                method=STUDY.grouped,
            ),
            record=expand(
                "results/models/{method}/{{concept}}/train.json", method=STUDY.grouped
            ),
        log:
            "logs/erase/group/{concept}.log",
        retries: 2
        conda:
            "../../envs/train.yaml"
        resources:
            gpu=1,
            runtime=lambda wildcards, attempt: 120 * attempt,
        params:
            concept=concept_row,
            settings=group_settings(STUDY.grouped),
            model=STUDY.model,
            seed=STUDY.seed,
            trainer_version=TRAINER_VERSION,
            runtime=untracked(STUDY.train_runtime),
            checkpoint_dir="results/.checkpoints/group/{concept}",
        script:
            "../scripts/erase.py"


# Paper Table 6's own cells (a cell equal to a Table 1 method is that method's job).
if STUDY.sweep_grouped:

    rule erase_sweep:
        input:
            split="results/splits/{concept}.json",
            model=base_model,
        output:
            delta=expand(
                "results/models/{method}/{{concept}}/delta.safetensors",
                method=STUDY.sweep_grouped,
            ),
            record=expand(
                "results/models/{method}/{{concept}}/train.json",
                method=STUDY.sweep_grouped,
            ),
        log:
            "logs/erase/sweep/{concept}.log",
        wildcard_constraints:
            concept=one_of(SWEEP_CONCEPTS),
        retries: 2
        conda:
            "../../envs/train.yaml"
        resources:
            gpu=1,
            runtime=lambda wildcards, attempt: 240 * attempt,
        params:
            concept=concept_row,
            settings=group_settings(STUDY.sweep_grouped),
            model=STUDY.model,
            seed=STUDY.seed,
            trainer_version=TRAINER_VERSION,
            runtime=untracked(STUDY.train_runtime),
            checkpoint_dir="results/.checkpoints/sweep/{concept}",
        script:
            "../scripts/erase.py"
