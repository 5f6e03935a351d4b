# What compute nodes without internet need, fetched on the login node (`snakemake download`):
# model weights into the shared Hugging Face cache (HF_HOME), and the CorefConcept files.


rule download_models:
    output:
        touch("results/.downloaded"),
    log:
        "logs/download.log",
    localrule: True
    conda:
        "../../envs/llm.yaml"
    params:
        repos=download_repos(),
    script:
        "../scripts/download.py"


rule corefconcept_file:
    output:
        "results/corefconcept/{category}.json",
    log:
        "logs/corefconcept/{category}.log",
    localrule: True
    conda:
        "../../envs/llm.yaml"
    params:
        source=DATASET,
        sha256=lambda wildcards: STUDY.lists.dataset_sha256.get(wildcards.category),
    script:
        "../scripts/corefconcept_file.py"
