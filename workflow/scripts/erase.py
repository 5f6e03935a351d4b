from crce.erase import run
from crce.logs import job_log

with job_log(snakemake.log[0]):
    run(
        concept=snakemake.params.concept,
        method=snakemake.wildcards.method,
        method_spec=snakemake.params.method_spec,
        config=snakemake.config,
        split_path=snakemake.input.split,
        output=snakemake.output.delta,
        checkpoint_dir=snakemake.params.checkpoint_dir,
    )
