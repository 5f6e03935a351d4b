from crce.logs import job_log
from crce.robustness import run_prompts

with job_log(snakemake.log[0]):
    p = snakemake.params
    run_prompts(
        split_path=snakemake.input.split,
        settings=p.settings,
        list_settings=p.lists,
        runtime=vars(p.runtime),
        output=snakemake.output[0],
        server_log=p.server_log,
    )
