# CRCE concept-erasure study: sheet -> lists -> splits -> erased models -> images -> judgments
# -> metrics -> Table 1. `snakemake --profile slurm results/table1.csv` runs the paper's study;
# `--configfile config/test.yaml` or `config/demo.yaml` run smaller worlds with the same rules.


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/corefs.smk"
include: "workflow/rules/erase.smk"


rule all:
    input:
        all_splits(),


rule corefs:
    input:
        all_corefs(),


rule splits:
    input:
        all_splits(),


rule models:
    input:
        all_models(),
