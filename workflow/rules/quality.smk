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
            build=STUDY.features_build,
            seed=STUDY.seed,
        script:
            "../scripts/features_model.py"


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
        what="quality.prompts",
    script:
        "../scripts/quality_prompts.py"


rule sample_neutral:
    input:
        prompts="results/quality/prompts.csv",
        delta=trained_delta,
        model=base_model,
        extra=sampling_inputs,
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
        quality=STUDY.quality.neutral_params() if STUDY.quality else None,
        settings=STUDY.sample.as_params(),
        model=STUDY.model,
        sampling=sampling,
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
        "../../envs/evaluate.yaml"
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
        "../../envs/evaluate.yaml"
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


rule robust_prompts:
    input:
        split="results/splits/{concept}.json",
    output:
        "results/robustness/prompts/{concept}.json",
    log:
        "logs/robustness/prompts/{concept}.log",
    conda:
        "../../envs/llm.yaml"
    resources:
        gpu=1 if STUDY.llm_runtime.serve and STUDY.robustness.llm_prompts else 0,
    params:
        settings=STUDY.robustness.as_params(),
        lists=STUDY.lists.as_params(),
        runtime=untracked(STUDY.llm_runtime),
        server_log="logs/robustness/prompts/{concept}.server.log",
    script:
        "../scripts/robust_prompts.py"


rule sample_robust:
    input:
        prompts="results/robustness/prompts/{concept}.json",
        delta=trained_delta,
        model=base_model,
        extra=sampling_inputs,
    output:
        "results/robustness/images/{method}/{concept}/manifest.parquet",
    log:
        "logs/robustness/sample/{method}/{concept}.log",
    retries: 2
    conda:
        "../../envs/sample.yaml"
    resources:
        gpu=1,
        runtime=lambda wildcards, attempt: 60 * attempt,
    params:
        category=lambda wildcards: CONCEPTS[wildcards.concept].category,
        seed=STUDY.seed,
        settings=STUDY.robustness.as_params(),
        sample=STUDY.sample.as_params(),
        model=STUDY.model,
        sampling=sampling,
        runtime=untracked(STUDY.sample_runtime),
    script:
        "../scripts/sample_robust.py"


# Judged exactly as Table 1's images (rule judge), with a cache and logs of their own.
use rule judge as judge_robust with:
    input:
        **{
            m: f"results/robustness/images/{m}/{{concept}}/manifest.parquet"
            for m in METHODS
        },
    output:
        **judgments_of(METHODS, "robustness/judgments"),
    log:
        "logs/robustness/judge/{concept}.log",
    resources:
        gpu=1 if STUDY.judge_runtime.serve else 0,
        runtime=lambda wildcards, attempt: 60 * attempt,
    params:
        cache="results/judge_cache/{concept}.robust.jsonl",
        server_log="logs/robustness/judge/{concept}.server.log",


rule robustness:
    input:
        judgments=expand(
            "results/robustness/judgments/{method}/{concept}.parquet",
            method=METHODS,
            concept=CONCEPTS,
        ),
        metrics="results/metrics.parquet",
    output:
        report(
            "results/robustness.csv",
            caption="../report/robustness.rst",
            category="Beyond Table 1",
        ),
    log:
        "logs/robustness/robustness.log",
    localrule: True
    conda:
        "../../envs/report.yaml"
    params:
        labels=STUDY.labels,
    script:
        "../scripts/robustness.py"


rule audit_second:
    input:
        unpack(audit_inputs),
    output:
        "results/audit/second/{concept}.parquet",
    log:
        "logs/audit/{concept}.log",
    conda:
        "../../envs/evaluate.yaml"
    resources:
        gpu=1,
    params:
        settings=STUDY.audit.second_judge_params(),
        features=STUDY.features.as_params(),
        judge=STUDY.judge.as_params(),
        category=lambda wildcards: CONCEPTS[wildcards.concept].category,
        runtime=untracked(STUDY.features_runtime),
        judge_runtime=untracked(STUDY.judge_runtime),
        cache="results/judge_cache/{concept}.audit.jsonl",
        server_log="logs/audit/{concept}.server.log",
    script:
        "../scripts/audit_second.py"


rule judge_audit:
    input:
        expand("results/audit/second/{concept}.parquet", concept=CONCEPTS),
    output:
        table=report(
            "results/judge_audit.csv",
            caption="../report/judge_audit.rst",
            category="Beyond Table 1",
        ),
        sheet="results/audit/sheet.csv",
        page="results/audit/sheet.html",
    log:
        "logs/audit/judge_audit.log",
    localrule: True
    conda:
        "../../envs/evaluate.yaml"
    params:
        settings=STUDY.audit.as_params(),
    script:
        "../scripts/judge_audit.py"
