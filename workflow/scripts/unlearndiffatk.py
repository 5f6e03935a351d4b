from crce.attacks.unlearndiffatk import run_attack
from crce.logs import job_log

with job_log(snakemake.log[0]):
    p = snakemake.params
    run_attack(
        split_path=snakemake.input.split,
        base_judgments=snakemake.input.base_judgments,
        judgments=snakemake.input.judgments,
        method=snakemake.wildcards.method,
        category=p.category,
        seed=p.seed,
        settings=p.settings,
        images=p.images,
        model=p.model,
        delta=next(iter(snakemake.input.delta), None),
        sample=p.sample,
        runtime=vars(p.runtime),
        output=snakemake.output.units,
        manifest=snakemake.output.manifest,
        sampling=p.sampling if isinstance(p.sampling, dict) else None,
    )
