# The base model, when the workflow builds it (tiny and toy worlds) instead of downloading it.


rule base_model:
    output:
        directory(STUDY.model),
    log:
        "logs/base_model.log",
    conda:
        "../../envs/train.yaml"
    params:
        build=STUDY.model_build,
        seed=STUDY.seed,
    script:
        "../scripts/base_model.py"
