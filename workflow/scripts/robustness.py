from crce.logs import job_log
from crce.metrics import run_robustness_table

with job_log(snakemake.log[0]):
    run_robustness_table(
        judgments=list(snakemake.input.judgments),
        metrics=snakemake.input.metrics,
        labels=snakemake.params.labels,
        output=snakemake.output[0],
    )
