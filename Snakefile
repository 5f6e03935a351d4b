# CRCE concept-erasure study: sheet -> lists -> splits -> erased models -> images -> judgments
# -> metrics -> Table 1. `snakemake --profile slurm results/table1.csv` runs the paper's study;
# `--configfile=config/demo.yaml` or `--configfile=config/test.yaml` run smaller worlds with
# the same rules.


from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/corefs.smk"
include: "workflow/rules/erase.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/judge.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/quality.smk"
include: "workflow/rules/attacks.smk"


rule all:
    input:
        "results/table1.csv",
        "results/retains_by_distance.csv",
        all_figures(),
        all_clip_distances(),


rule corefs:
    input:
        all_corefs(),


rule splits:
    input:
        all_splits(),


rule models:
    input:
        all_models(),


# Images only: no judging, metrics or figures.
rule images:
    input:
        all_manifests(),


rule judgments:
    input:
        all_judgments(),


rule table1:
    input:
        "results/table1.csv",
        "results/retains_by_distance.csv",
        all_figures(),


# Paper Table 6: CRCE over the (M, N) grid of config `sweep`.
rule table6:
    input:
        "results/table6.csv",
        table6_figures(),


# Erasure under attack: Ring-A-Bell's prompts sampled by every method, pre-ASR and ASR.
rule attacks:
    input:
        "results/attacks.csv",
        attack_figures(),


# Login node, before a cluster run: model weights and the CorefConcept files.
rule download:
    input:
        "results/.downloaded",
        all_dataset_files(),
