from crce.figures import concept_grid
from crce.logs import job_log

with job_log(snakemake.log[0]):
    labels = {m: spec.get("label", m) for m, spec in snakemake.params.methods.items()}
    concept_grid(list(snakemake.input), labels, snakemake.output[0])
