from crce.erase import run
from crce.logs import job_log

with job_log(snakemake.log[0]):
    p = snakemake.params
    deltas = snakemake.output.delta  # one method (erase) or a group (erase_group)
    deltas = [deltas] if isinstance(deltas, str) else list(deltas)
    run(
        concept=p.concept,
        methods=p.settings,
        model=p.model,
        seed=p.seed,
        trainer_version=p.trainer_version,
        runtime=vars(p.runtime),
        split_path=snakemake.input.split,
        outputs=dict(zip(p.settings, deltas, strict=True)),
        checkpoint_dir=p.checkpoint_dir,
    )
