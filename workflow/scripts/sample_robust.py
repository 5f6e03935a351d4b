from crce.logs import job_log
from crce.sample import run_robust

with job_log(snakemake.log[0]):
    p = snakemake.params
    run_robust(
        prompts=snakemake.input.prompts,
        method=snakemake.wildcards.method,
        category=p.category,
        seed=p.seed,
        settings=p.settings,
        sample=p.sample,
        runtime=vars(p.runtime),
        model=p.model,
        delta=next(iter(snakemake.input.delta), None),
        manifest=snakemake.output[0],
        sampling=p.sampling if isinstance(p.sampling, dict) else None,
    )
