# The base model, when the workflow builds it (tiny and toy worlds) instead of downloading it.


rule base_model:
    output:
        directory(config["model"]["pretrained"]),
    log:
        "logs/base_model.log",
    conda:
        "../../envs/train.yaml"
    params:
        kind=config["model"].get("build"),
        seed=config["seed"],
    script:
        "../scripts/base_model.py"
