from crce.logs import job_log
from crce.sample import run_references

with job_log(snakemake.log[0]):
    run_references(
        params=snakemake.params.request,
        runtime=vars(snakemake.params.runtime),
        manifest=snakemake.output.manifest,
        latents=snakemake.output.latents,
        split=split if isinstance(split := snakemake.input.split, str) else None,
        anchor=anchor if isinstance(anchor := snakemake.input.anchor, str) else None,
    )
