from crce.logs import job_log
from crce.metrics import run_retains_by_distance

with job_log(snakemake.log[0]):
    run_retains_by_distance(
        judgments=list(snakemake.input.judgments),
        distances=list(snakemake.input.distances),
        labels=snakemake.params.labels,
        output=snakemake.output[0],
    )
