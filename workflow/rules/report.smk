# Metrics, Table 1, figures and the text-space distance table (light, no GPU).


rule metrics:
    input:
        all_judgments(),
    output:
        metrics="results/metrics.parquet",
        table=report(
            "results/table1.csv", caption="../report/table1.rst", category="Table 1"
        ),
        markdown="results/table1.md",
        paper=report(
            "results/table1_vs_paper.csv",
            caption="../report/table1_vs_paper.rst",
            category="Table 1",
        ),
        # Judge answers unreadable after one re-ask, per method and category.
        invalid="results/judge_invalid.csv",
    log:
        "logs/metrics.log",
    localrule: True
    conda:
        "../../envs/report.yaml"
    params:
        labels=STUDY.labels,
    script:
        "../scripts/metrics.py"


rule concept_figure:
    input:
        unpack(concept_manifests),
    output:
        report(
            "results/figures/grids/{concept}.png",
            caption="../report/grids.rst",
            category="Image grids",
        ),
    log:
        "logs/figures/grids/{concept}.log",
    localrule: True
    conda:
        "../../envs/report.yaml"
    params:
        labels=STUDY.labels,
    script:
        "../scripts/concept_figure.py"


rule category_figure:
    input:
        "results/metrics.parquet",
    output:
        report(
            "results/figures/bars/{category}.png",
            caption="../report/bars.rst",
            category="Bar charts",
        ),
    log:
        "logs/figures/bars/{category}.log",
    localrule: True
    conda:
        "../../envs/report.yaml"
    params:
        labels=STUDY.labels,
    script:
        "../scripts/category_figure.py"


rule clip_distances:
    input:
        split="results/splits/{concept}.json",
        model=base_model,
    output:
        report(
            "results/clip_distances/{concept}.csv",
            caption="../report/distances.rst",
            category="Text-space distances",
        ),
    log:
        "logs/clip_distances/{concept}.log",
    conda:
        "../../envs/sample.yaml"
    params:
        model=STUDY.model,
    script:
        "../scripts/clip_distances.py"


rule table2_vs_paper:
    input:
        "results/clip_distances/{concept}.csv",
    output:
        report(
            "results/table2_vs_paper/{concept}.csv",
            caption="../report/table2_vs_paper.rst",
            category="Text-space distances",
        ),
    log:
        "logs/table2_vs_paper/{concept}.log",
    localrule: True
    conda:
        "../../envs/report.yaml"
    params:
        paper_concept=lambda wildcards: CONCEPTS[wildcards.concept].text.casefold(),
    script:
        "../scripts/table2_vs_paper.py"


rule table6_metrics:
    input:
        sweep_judgments(),
    output:
        report("results/table6.csv", caption="../report/table6.rst", category="Table 6"),
    log:
        "logs/table6.log",
    localrule: True
    conda:
        "../../envs/report.yaml"
    params:
        cells={name: list(mn) for mn, name in STUDY.sweep.cells.items()},
    script:
        "../scripts/table6.py"


rule table6_figure:
    input:
        "results/table6.csv",
    output:
        report(
            "results/figures/table6/{metric}.png",
            caption="../report/table6_heatmap.rst",
            category="Table 6",
        ),
    log:
        "logs/figures/table6/{metric}.log",
    localrule: True
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/table6_figure.py"


rule retains_by_distance:
    input:
        judgments=all_judgments(),
        distances=expand("results/clip_distances/{concept}.csv", concept=CONCEPTS),
    output:
        report(
            "results/retains_by_distance.csv",
            caption="../report/retains_by_distance.rst",
            category="Table 1",
        ),
    log:
        "logs/retains_by_distance.log",
    localrule: True
    conda:
        "../../envs/report.yaml"
    params:
        labels=STUDY.labels,
    script:
        "../scripts/retains_by_distance.py"
