from crce.audit import second_opinion_clip, second_opinion_renders
from crce.logs import job_log
from crce.modeling import device_for
from crce.settings import AuditSettings, FeatureRuntime, FeatureSettings

with job_log(snakemake.log[0]):
    p = snakemake.params
    if AuditSettings(**p.settings).second_judge == "renders":
        second_opinion_renders(
            split_path=snakemake.input.split,
            settings=p.settings,
            judge_settings=p.judge,
            judge_runtime=vars(p.judge_runtime),
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
            device=str(device_for(FeatureRuntime(**vars(p.runtime)).device)),
            template=AuditSettings(**p.settings).template,
            output=snakemake.output[0],
        )
