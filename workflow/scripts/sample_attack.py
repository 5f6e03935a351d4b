from crce.logs import job_log
from crce.sample import run_attack_images

with job_log(snakemake.log[0]):
    p = snakemake.params
    run_attack_images(
        prompts=snakemake.input.prompts,
        method=snakemake.wildcards.method,
        category=p.category,
        seed=p.seed,
        images=p.images,
        sample=p.sample,
        runtime=vars(p.runtime),
        model=p.model,
        delta=next(iter(snakemake.input.delta), None),
        manifest=snakemake.output[0],
        sampling=p.sampling if isinstance(p.sampling, dict) else None,
    )
