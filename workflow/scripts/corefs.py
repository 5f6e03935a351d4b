from crce.concepts import Concept
from crce.corefs import run
from crce.logs import job_log

with job_log(snakemake.log[0]):
    run(Concept(**snakemake.params.concept), snakemake.config, snakemake.output[0])
