from crce.lists import read_lists, write_model
from crce.logs import job_log
from crce.split import make_split

with job_log(snakemake.log[0]):
    p = snakemake.params
    split = make_split(read_lists(snakemake.input[0]), p.seed, p.n_train, p.n_test)
    write_model(split, snakemake.output[0])
