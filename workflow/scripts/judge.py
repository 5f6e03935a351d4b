from crce.judge import judge_manifests
from crce.logs import job_log

with job_log(snakemake.log[0]):
    judge_manifests(
        list(snakemake.input),
        list(snakemake.output),
        settings=snakemake.config["judge"],
        cache_path=snakemake.params.cache,
        server_log=snakemake.params.server_log,
    )
