from crce.fetch import fetch_file
from crce.logs import job_log

with job_log(snakemake.log[0]):
    p = snakemake.params
    fetch_file(p.source, p.sha256, snakemake.output[0], p.what)
