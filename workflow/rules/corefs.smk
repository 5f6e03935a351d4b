# Coref/retain lists per concept (curated file, CorefConcept dataset or LLM) and their split.


rule coref_lists:
    input:
        curated_lists,
    output:
        "results/corefs/{concept}.json",
    log:
        "logs/corefs/{concept}.log",
    conda:
        "../../envs/llm.yaml"
    resources:
        # A GPU only when the job serves its own LLM (llm.serve); an API call needs none.
        gpu=lambda wildcards: 1 if config["llm"].get("serve") else 0,
    params:
        concept=concept_row,
    script:
        "../scripts/corefs.py"


rule split:
    input:
        "results/corefs/{concept}.json",
    output:
        "results/splits/{concept}.json",
    log:
        "logs/splits/{concept}.log",
    localrule: True
    conda:
        "../../envs/llm.yaml"
    params:
        seed=config["seed"],
        n_train=config["split"]["n_train"],
        n_test=config["split"]["n_test"],
    script:
        "../scripts/split.py"
