from crce.erase import run
from crce.logs import job_log

with job_log(snakemake.log[0]):
    p = snakemake.params
    run(
        concept=p.concept,
        methods=p.settings,
        model=p.model,
        seed=p.seed,
        trainer_version=p.trainer_version,
        runtime=vars(p.runtime),
        split_path=snakemake.input.split,
        outputs={snakemake.wildcards.method: snakemake.output.delta},
        checkpoint_dir=p.checkpoint_dir,
    )
