from crce.logs import job_log
from crce.methods.mace import write_cache

with job_log(snakemake.log[0]):
    write_cache(
        model=snakemake.params.model,
        prompts_csv=snakemake.input.prompts,
        output=snakemake.output[0],
        device=snakemake.params.runtime.device,
    )
