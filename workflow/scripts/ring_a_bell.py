from crce.attacks.ring_a_bell import run_search
from crce.logs import job_log

with job_log(snakemake.log[0]):
    p = snakemake.params
    run_search(
        split_path=snakemake.input.split,
        pairs_path=snakemake.input.pairs,
        model=p.model,
        settings=p.settings,
        seed=p.seed,
        output=snakemake.output[0],
        device=p.runtime.device,
    )
