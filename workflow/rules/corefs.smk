# Coref/retain lists per concept (curated file, CorefConcept dataset or LLM) and their split.


rule coref_lists:
    input:
        curated=curated_lists,
        dataset=concept_dataset_file,
    output:
        "results/corefs/{concept}.json",
    log:
        "logs/corefs/{concept}.log",
    conda:
        "../../envs/llm.yaml"
    resources:
        # A GPU only when the job serves its own LLM (llm.serve); an API call needs none.
        gpu=1 if STUDY.llm_runtime.serve else 0,
    params:
        concept=concept_row,
        settings=STUDY.lists.as_params(),
        runtime=untracked(STUDY.llm_runtime),
        server_log="logs/corefs/{concept}.server.log",
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
        settings=STUDY.split.as_params(),
    script:
        "../scripts/split.py"


# Concept Ablation's anchor from the LLM (a method with `anchors: llm`), with its captions.
rule anchor:
    input:
        "results/splits/{concept}.json",
    output:
        "results/anchors/{concept}.json",
    log:
        "logs/anchors/{concept}.log",
    conda:
        "../../envs/llm.yaml"
    resources:
        gpu=1 if STUDY.llm_runtime.serve else 0,
    params:
        captions=STUDY.anchor_captions,
        settings=STUDY.lists.as_params(),
        runtime=untracked(STUDY.llm_runtime),
        server_log="logs/anchors/{concept}.server.log",
    script:
        "../scripts/anchor.py"
