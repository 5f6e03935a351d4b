from crce.files import honour_umask
from crce.logs import job_log
from crce.modeling import load_pipeline
from crce.plugins import load_object

with job_log(snakemake.log[0]):
    build = load_object(snakemake.params.build, "model builder")
    build(snakemake.output[0], seed=snakemake.params.seed)
    honour_umask(snakemake.output[0])
    load_pipeline(snakemake.output[0])  # what every job will do with it
