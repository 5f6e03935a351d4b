# Beyond Table 1, optional targets on the same images where possible: what erasure costs the
# model (`quality`), robustness to rephrasing (`robustness`), how far to trust the judge
# (`judge_audit`).


if STUDY.features_build:

    rule features_model:
        output:
            directory(STUDY.features.pretrained),
        log:
            "logs/features_model.log",
        conda:
            "../../envs/train.yaml"
        params:
            kind=STUDY.features_build,
            seed=STUDY.seed,
        script:
            "../scripts/base_model.py"


rule quality_prompts:
    output:
        "results/quality/prompts.csv",
    log:
        "logs/quality/prompts.log",
    localrule: True
    conda:
        "../../envs/llm.yaml"
    params:
        source=STUDY.quality.prompts if STUDY.quality else None,
        sha256=STUDY.quality.prompts_sha256 if STUDY.quality else None,
    script:
        "../scripts/quality_prompts.py"


rule sample_neutral:
    input:
        prompts="results/quality/prompts.csv",
        delta=trained_delta,
        model=base_model,
    output:
        "results/quality/images/{method}/{concept}/manifest.parquet",
    log:
        "logs/quality/sample/{method}/{concept}.log",
    retries: 2
    conda:
        "../../envs/sample.yaml"
    resources:
        gpu=1,
        runtime=lambda wildcards, attempt: 60 * attempt,
    params:
        quality=STUDY.quality.as_params() if STUDY.quality else None,
        settings=STUDY.sample.as_params(),
        model=STUDY.model,
        runtime=untracked(STUDY.sample_runtime),
    script:
        "../scripts/sample_neutral.py"


rule features:
    input:
        manifests=[
            "results/images/{method}/{concept}/manifest.parquet",
            "results/quality/images/{method}/{concept}/manifest.parquet",
        ],
        model=feature_model,
    output:
        "results/quality/features/{method}/{concept}.parquet",
    log:
        "logs/quality/features/{method}/{concept}.log",
    conda:
        "../../envs/sample.yaml"
    resources:
        gpu=1,
        runtime=lambda wildcards, attempt: 30 * attempt,
    params:
        settings=STUDY.features.as_params(),
        runtime=untracked(STUDY.features_runtime),
    script:
        "../scripts/features.py"


rule quality:
    input:
        all_features(),
    output:
        table=report(
            "results/quality.csv",
            caption="../report/quality.rst",
            category="Beyond Table 1",
        ),
        figure=report(
            "results/figures/quality.png",
            caption="../report/quality_figure.rst",
            category="Beyond Table 1",
        ),
    log:
        "logs/quality/quality.log",
    conda:
        "../../envs/sample.yaml"
    resources:
        gpu=1 if STUDY.quality and STUDY.quality.real_images else 0,
    params:
        categories={c.id: c.category for c in CONCEPTS.values()},
        labels=STUDY.labels,
        settings=STUDY.quality.as_params() if STUDY.quality else None,
        features=STUDY.features.as_params(),
        runtime=untracked(STUDY.features_runtime),
    script:
        "../scripts/quality.py"
