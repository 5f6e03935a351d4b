from crce.erase import run
from crce.logs import job_log

with job_log(snakemake.log[0]):
    p = snakemake.params
    run(
        methods=p.settings,
        model=p.model,
        seed=p.seed,
        trainer_version=p.trainer_version,
        runtime=vars(p.runtime),
        split_path=snakemake.input.split,
        outputs=p.outputs,
        checkpoint_dir=p.checkpoint_dir,
        references=p.references,
    )
