from crce.logs import job_log
from crce.worlds.tiny import build_base_model

with job_log(snakemake.log[0]):
    build_base_model(snakemake.params.kind, snakemake.output[0], seed=snakemake.params.seed)
