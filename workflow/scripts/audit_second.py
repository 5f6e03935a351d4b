from crce.audit import second_opinion_clip, second_opinion_renders
from crce.logs import job_log
from crce.settings import (
    AuditSettings,
    FeatureRuntime,
    FeatureSettings,
    JudgeRuntime,
    JudgeSettings,
)

with job_log(snakemake.log[0]):
    p = snakemake.params
    settings = AuditSettings(**p.settings)
    if settings.second_judge != "clip":
        second_opinion_renders(
            split_path=snakemake.input.split,
            settings=settings,
            judge_settings=JudgeSettings(**p.judge),
            judge_runtime=JudgeRuntime(**vars(p.judge_runtime)),
            category=p.category,
            cache=p.cache,
            output=snakemake.output[0],
            server_log=p.server_log,
        )
    else:
        second_opinion_clip(
            judgments=list(snakemake.input.judgments),
            split_path=snakemake.input.split,
            features=FeatureSettings(**p.features),
            runtime=FeatureRuntime(**vars(p.runtime)),
            template=settings.template,
            output=snakemake.output[0],
        )
