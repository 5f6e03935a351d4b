from crce.figures import concept_grid
from crce.logs import job_log

with job_log(snakemake.log[0]):
    concept_grid(list(snakemake.input), snakemake.params.labels, snakemake.output[0])
