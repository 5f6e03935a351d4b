from crce.attacks.asr import run_attack_table
from crce.logs import job_log

with job_log(snakemake.log[0]):
    run_attack_table(
        attack_judgments=list(snakemake.input.attack_judgments),
        table1_judgments=list(snakemake.input.table1_judgments),
        prompts=list(snakemake.input.prompts),
        unit_judgments=list(snakemake.input.unit_judgments),
        units=list(snakemake.input.units),
        labels=snakemake.params.labels,
        output=snakemake.output[0],
    )
