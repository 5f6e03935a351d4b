from crce.logs import job_log
from crce.sample import run
from crce.settings import SampleRuntime, SampleSettings

with job_log(snakemake.log[0]):
    p = snakemake.params
    run(
        split_path=snakemake.input.split,
        method=snakemake.wildcards.method,
        settings=SampleSettings(**p.settings),
        runtime=SampleRuntime(**vars(p.runtime)),
        model=p.model,
        seed=p.seed,
        delta=next(iter(snakemake.input.delta), None),
        manifest=snakemake.output[0],
        sampling=p.sampling if isinstance(p.sampling, dict) else None,
    )
