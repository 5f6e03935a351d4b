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
        repos=lambda wildcards: [
            r
            for r in (
                (
                    None
                    if config["model"].get("build")
                    else config["model"]["pretrained"]
                ),
                config["judge"]["model"] if config["judge"].get("serve") else None,
            )
            if r
        ],
    script:
        "../scripts/download.py"
