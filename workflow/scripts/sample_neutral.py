from crce.logs import job_log
from crce.sample import run_neutral

with job_log(snakemake.log[0]):
    p = snakemake.params
    run_neutral(
        prompts=snakemake.input.prompts,
        method=snakemake.wildcards.method,
        concept=snakemake.wildcards.concept,
        quality=p.quality,
        settings=p.settings,
        runtime=vars(p.runtime),
        model=p.model,
        delta=next(iter(snakemake.input.delta), None),
        manifest=snakemake.output[0],
        sampling=p.sampling if isinstance(p.sampling, dict) else None,
    )
