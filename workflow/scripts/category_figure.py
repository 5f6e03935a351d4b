from crce.figures import category_bars
from crce.logs import job_log

with job_log(snakemake.log[0]):
    category_bars(
        snakemake.input[0],
        snakemake.params.labels,
        snakemake.wildcards.category,
        snakemake.output[0],
    )
