# Erasure under attack (`attacks`): prompts searched to bring a concept back, sampled by every
# method at its base prompts' Table 1 seeds, judged as the target's images; pre-ASR and ASR.


rule ring_a_bell_pairs:
    input:
        split="results/splits/{concept}.json",
    output:
        "results/attacks/ring_a_bell/pairs/{concept}.json",
    log:
        "logs/attacks/ring_a_bell/pairs/{concept}.log",
    conda:
        "../../envs/llm.yaml"
    resources:
        gpu=1 if STUDY.llm_runtime.serve else 0,
    params:
        settings=STUDY.attacks.attack_params("ring_a_bell"),
        lists=STUDY.lists.as_params(),
        runtime=untracked(STUDY.llm_runtime),
        server_log="logs/attacks/ring_a_bell/pairs/{concept}.server.log",
    script:
        "../scripts/ring_a_bell_pairs.py"


rule ring_a_bell:
    input:
        split="results/splits/{concept}.json",
        pairs="results/attacks/ring_a_bell/pairs/{concept}.json",
        model=base_model,
    output:
        "results/attacks/ring_a_bell/prompts/{concept}.json",
    log:
        "logs/attacks/ring_a_bell/{concept}.log",
    conda:
        "../../envs/sample.yaml"
    resources:
        gpu=1,
        runtime=lambda wildcards, attempt: 240 * attempt,
    params:
        settings=STUDY.attacks.attack_params("ring_a_bell"),
        model=STUDY.model,
        seed=STUDY.seed,
        runtime=untracked(STUDY.sample_runtime),
    script:
        "../scripts/ring_a_bell.py"


rule sample_attack:
    input:
        prompts="results/attacks/{attack}/prompts/{concept}.json",
        delta=trained_delta,
        model=base_model,
        extra=sampling_inputs,
    output:
        "results/attacks/{attack}/images/{method}/{concept}/manifest.parquet",
    log:
        "logs/attacks/{attack}/sample/{method}/{concept}.log",
    wildcard_constraints:
        attack=one_of(STUDY.attacks.prompt_attacks),
    retries: 2
    conda:
        "../../envs/sample.yaml"
    resources:
        gpu=1,
        runtime=lambda wildcards, attempt: 60 * attempt,
    params:
        category=lambda wildcards: CONCEPTS[wildcards.concept].category,
        seed=STUDY.seed,
        images=STUDY.attacks.images_per_prompt,
        sample=STUDY.sample.as_params(),
        model=STUDY.model,
        sampling=sampling,
        runtime=untracked(STUDY.sample_runtime),
    script:
        "../scripts/sample_attack.py"


# Judged exactly as Table 1's target images (rule judge), with a cache and logs of their own.
use rule judge as judge_attack with:
    input:
        **{
            m: f"results/attacks/{{attack}}/images/{m}/{{concept}}/manifest.parquet"
            for m in METHODS
        },
    output:
        **judgments_of(METHODS, "attacks/{attack}/judgments"),
    log:
        "logs/attacks/{attack}/judge/{concept}.log",
    wildcard_constraints:
        attack=one_of(STUDY.attacks.prompt_attacks),
    params:
        cache="results/judge_cache/{concept}.{attack}.jsonl",
        server_log="logs/attacks/{attack}/judge/{concept}.server.log",


rule unlearndiffatk:
    input:
        split="results/splits/{concept}.json",
        base_judgments=f"results/judgments/{STUDY.base_method}/{{concept}}.parquet",
        judgments="results/judgments/{method}/{concept}.parquet",
        delta=trained_delta,
        model=base_model,
        extra=sampling_inputs,
    output:
        units="results/attacks/unlearndiffatk/units/{method}/{concept}.json",
        manifest="results/attacks/unlearndiffatk/images/{method}/{concept}/manifest.parquet",
    log:
        "logs/attacks/unlearndiffatk/{method}/{concept}.log",
    wildcard_constraints:
        method=one_of(UDA_METHODS),
        concept=one_of(UDA_CONCEPTS),
    retries: 2
    conda:
        "../../envs/sample.yaml"
    resources:
        gpu=1,
        runtime=lambda wildcards, attempt: 240 * attempt,
    params:
        settings=STUDY.attacks.unlearndiffatk.as_params(),
        category=lambda wildcards: CONCEPTS[wildcards.concept].category,
        seed=STUDY.seed,
        images=STUDY.attacks.images_per_prompt,
        sample=STUDY.sample.as_params(),
        model=STUDY.model,
        sampling=sampling,
        runtime=untracked(STUDY.sample_runtime),
    script:
        "../scripts/unlearndiffatk.py"


if UDA_CONCEPTS:

    # Every round's image of every attacked method, judged as the target's images.
    use rule judge as judge_uda with:
        input:
            **{
                m: f"results/attacks/unlearndiffatk/images/{m}/{{concept}}/manifest.parquet"
                for m in UDA_METHODS
            },
        output:
            **judgments_of(UDA_METHODS, "attacks/unlearndiffatk/judgments"),
        log:
            "logs/attacks/unlearndiffatk/judge/{concept}.log",
        wildcard_constraints:
            concept=one_of(UDA_CONCEPTS),
        params:
            cache="results/judge_cache/{concept}.unlearndiffatk.jsonl",
            server_log="logs/attacks/unlearndiffatk/judge/{concept}.server.log",


rule attack_table:
    input:
        attack_judgments=all_attack_judgments(),
        table1_judgments=all_judgments(),
        prompts=all_attack_prompts(),
        unit_judgments=all_uda_judgments(),
        units=all_uda_units(),
    output:
        report(
            "results/attacks.csv",
            caption="../report/attacks.rst",
            category="Beyond Table 1",
        ),
    log:
        "logs/attacks/attacks.log",
    localrule: True
    conda:
        "../../envs/report.yaml"
    params:
        labels=STUDY.labels,
    script:
        "../scripts/attacks.py"


rule attack_figure:
    input:
        "results/attacks.csv",
    output:
        report(
            "results/figures/attacks/{category}.png",
            caption="../report/attacks_figure.rst",
            category="Beyond Table 1",
        ),
    log:
        "logs/figures/attacks/{category}.log",
    localrule: True
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/attack_figure.py"
