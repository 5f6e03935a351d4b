# Weights for clusters whose compute nodes have no internet: run `snakemake download` on the
# login node; it fills the shared Hugging Face cache (HF_HOME) that compute jobs read offline.


rule download:
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
