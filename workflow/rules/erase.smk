# Erasure fine-tuning: one GPU job per trained method and concept.


rule erase:
    input:
        split="results/splits/{concept}.json",
        model=base_model,
    output:
        delta="results/models/{method}/{concept}/delta.safetensors",
        record="results/models/{method}/{concept}/train.json",
    log:
        "logs/erase/{method}/{concept}.log",
    retries: 2
    conda:
        "../../envs/train.yaml"
    resources:
        gpu=1,
        runtime=lambda wildcards, attempt: 60 * attempt,
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
