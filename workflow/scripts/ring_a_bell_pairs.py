from crce.attacks.pairs import run_pairs
from crce.logs import job_log

with job_log(snakemake.log[0]):
    p = snakemake.params
    run_pairs(
        split_path=snakemake.input.split,
        settings=p.settings,
        list_settings=p.lists,
        runtime=vars(p.runtime),
        output=snakemake.output[0],
        server_log=p.server_log,
    )
