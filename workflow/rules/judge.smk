# VLM judging: one job per concept judges every method's images with one server start.


rule judge:
    input:
        concept_manifests,
    output:
        expand("results/judgments/{method}/{{concept}}.parquet", method=METHODS),
    log:
        "logs/judge/{concept}.log",
    retries: 2
    conda:
        "../../envs/judge.yaml"
    resources:
        gpu=lambda wildcards: 1 if config["judge"].get("serve") else 0,
        runtime=lambda wildcards, attempt: 120 * attempt,
    params:
        # Append-only cache of judged rows; not an output, so it survives failed jobs.
        cache="results/judge_cache/{concept}.jsonl",
        server_log="logs/judge/{concept}.server.log",
    script:
        "../scripts/judge.py"
