from crce.download import download
from crce.logs import job_log

with job_log(snakemake.log[0]):
    download(snakemake.params.repos)
