from crce.logs import job_log
from crce.quality import fetch_prompts

with job_log(snakemake.log[0]):
    fetch_prompts(snakemake.params.source, snakemake.params.sha256, snakemake.output[0])
