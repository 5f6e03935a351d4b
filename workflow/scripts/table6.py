from crce.logs import job_log
from crce.metrics import run_table6

with job_log(snakemake.log[0]):
    run_table6(list(snakemake.input), snakemake.params.cells, snakemake.output[0])
