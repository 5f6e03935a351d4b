from crce.export import run
from crce.logs import job_log

with job_log(snakemake.log[0]):
    p = snakemake.params
    run(
        model=p.model,
        delta=next(iter(snakemake.input.delta), None),
        settings=p.settings,
        output=snakemake.output[0],
        record={"method": snakemake.wildcards.method, "concept": snakemake.wildcards.concept},
        sampling=p.sampling if isinstance(p.sampling, dict) else None,
    )
