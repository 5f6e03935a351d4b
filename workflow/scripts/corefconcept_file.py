from crce.corefconcept import fetch
from crce.logs import job_log

with job_log(snakemake.log[0]):
    p = snakemake.params
    fetch(p.source, f"{snakemake.wildcards.category}.json", p.sha256, snakemake.output[0])
