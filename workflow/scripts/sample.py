from crce.logs import job_log
from crce.sample import run

with job_log(snakemake.log[0]):
    run(
        split_path=snakemake.input.split,
        method=snakemake.wildcards.method,
        config=snakemake.config,
        delta=next(iter(snakemake.input.delta), None),
        manifest=snakemake.output[0],
    )
