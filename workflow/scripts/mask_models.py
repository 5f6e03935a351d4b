from crce.files import honour_umask
from crce.logs import job_log
from crce.plugins import load_object

with job_log(snakemake.log[0]):
    build = load_object(snakemake.params.build, "mask model builder")
    build(snakemake.output.detector, snakemake.output.sam, seed=snakemake.params.seed)
    for folder in snakemake.output:
        honour_umask(folder)
