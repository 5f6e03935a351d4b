# VLM judging: one job per concept judges every method's images with one server start.


rule judge:
    input:
        unpack(concept_manifests),
    output:
        **judgments_of(METHODS),
    log:
        "logs/judge/{concept}.log",
    retries: 2
    conda:
        "../../envs/judge.yaml"
    resources:
        gpu=1 if STUDY.judge_runtime.serve else 0,
        runtime=lambda wildcards, attempt: 120 * attempt,
    params:
        settings=STUDY.judge.as_params(),
        runtime=untracked(STUDY.judge_runtime),
        # Append-only cache of judged rows; not an output, so it survives failed jobs.
        cache="results/judge_cache/{concept}.jsonl",
        server_log="logs/judge/{concept}.server.log",
    script:
        "../scripts/judge.py"


# Paper Table 6's own cells: judged as Table 1's images (rule judge), apart, so they never
# enter Table 1's judging.
if SWEEP_ONLY:

    use rule judge as judge_sweep with:
        input:
            unpack(sweep_manifests),
        output:
            **judgments_of(SWEEP_ONLY, "judgments-sweep"),
        log:
            "logs/judge/sweep/{concept}.log",
        wildcard_constraints:
            concept=one_of(SWEEP_CONCEPTS),
        params:
            cache="results/judge_cache/{concept}.sweep.jsonl",
            server_log="logs/judge/sweep/{concept}.server.log",
