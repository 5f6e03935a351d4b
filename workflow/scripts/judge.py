from crce.judge import judge_manifests
from crce.logs import job_log
from crce.settings import JudgeRuntime, JudgeSettings

with job_log(snakemake.log[0]):
    p = snakemake.params
    judge_manifests(
        dict(snakemake.input.items()),
        dict(snakemake.output.items()),
        settings=JudgeSettings(**p.settings),
        runtime=JudgeRuntime(**vars(p.runtime)),
        cache_path=p.cache,
        server_log=p.server_log,
    )
