from crce.files import honour_umask
from crce.logs import job_log
from crce.plugins import load_object
from crce.vision import ClipFeatures

with job_log(snakemake.log[0]):
    build = load_object(snakemake.params.build, "feature model builder")
    build(snakemake.output[0], seed=snakemake.params.seed)
    honour_umask(snakemake.output[0])
    ClipFeatures(snakemake.output[0])  # what the feature jobs will do with it
