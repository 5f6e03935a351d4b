from crce.concepts import Concept
from crce.corefs import run
from crce.logs import job_log
from crce.settings import ListSettings, LlmRuntime

with job_log(snakemake.log[0]):
    p = snakemake.params
    run(
        Concept(**p.concept),
        ListSettings(**p.settings),
        LlmRuntime(**vars(p.runtime)),
        snakemake.output[0],
        server_log=p.server_log,
        dataset_file=next(iter(snakemake.input.dataset), None),
    )
