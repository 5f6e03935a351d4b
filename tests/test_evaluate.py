"""Sampling, judging and metrics on the tiny model and the fake vLLM-shaped server."""

import json
import math
import shlex
from pathlib import Path

import httpx2
import pandas as pd
import pytest
import torch
import yaml
from helpers import FAKE_SERVER, REPO

from crce.judge import JudgmentCache, judge_manifests, request_body
from crce.metrics import compute_metrics, table1, versus_paper, wilson
from crce.modeling import load_pipeline
from crce.sample import plan_images, sample_images
from crce.sample import run as sample_run
from crce.serving import render_command
from crce.settings import JudgeRuntime, JudgeSettings, SampleRuntime, SampleSettings


def test_vllm_command_from_the_default_config():
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    judge = config["judge"]
    argv = shlex.split(render_command(judge["serve"], port=8123, model=judge["model"]))
    assert argv == [
        "vllm", "serve", "Qwen/Qwen2-VL-7B-Instruct",
        "--host", "127.0.0.1", "--port", "8123",
        "--served-model-name", "Qwen/Qwen2-VL-7B-Instruct",
        "--max-model-len", "4096",
        "--limit-mm-per-prompt", '{"image":1}',
        "--gpu-memory-utilization", "0.9",
    ]  # fmt: skip


def test_plan_has_31_prompts_and_method_independent_seeds(cat_split):
    a = plan_images(cat_split, method="sd", seed=42, images_per_prompt=3)
    b = plan_images(cat_split, method="crce", seed=42, images_per_prompt=3)
    assert a["prompt"].nunique() == 31 and len(a) == 93
    assert a["group"].value_counts().to_dict() == {
        "target": 3,
        "coref_train": 30,
        "coref_test": 15,
        "retain_train": 30,
        "retain_test": 15,
    }
    assert list(a["seed"]) == list(b["seed"]) and a["seed"].nunique() == 93


def test_the_judge_asks_about_the_target_or_the_retain():
    from crce.judge import judge_question

    assert judge_question("retain_test", "dog breed 3", "cat", "retain") == "dog breed 3"
    assert judge_question("coref_test", "kitty", "cat", "retain") == "cat"
    assert judge_question("retain_test", "dog breed 3", "cat", "target") == "cat"


def test_retried_sampling_keeps_written_images(tiny_model, cat_split, tmp_path):
    pipe = load_pipeline(tiny_model)
    plan = plan_images(cat_split, method="sd", seed=1, images_per_prompt=1).head(6)
    kw = dict(steps=2, guidance=7.5, resolution=32, batch_size=4, progress=False)
    assert sample_images(pipe, plan, tmp_path, **kw)["sampled"] == 6
    kept = {p: (tmp_path / p).stat().st_mtime_ns for p in plan["path"][:4]}
    first_bytes = (tmp_path / plan["path"].iloc[0]).read_bytes()
    for p in plan["path"][4:]:
        (tmp_path / p).unlink()
    assert sample_images(pipe, plan, tmp_path, **kw)["sampled"] == 2
    assert all((tmp_path / p).stat().st_mtime_ns == m for p, m in kept.items())
    # Same seed -> same image, batch composition notwithstanding.
    (tmp_path / plan["path"].iloc[0]).unlink()
    sample_images(pipe, plan, tmp_path, **{**kw, "batch_size": 1})
    assert (tmp_path / plan["path"].iloc[0]).read_bytes() == first_bytes


def test_changed_settings_clear_stale_images(tiny_model, cat_split, tmp_path):
    split_path = tmp_path / "split.json"
    split_path.write_text(cat_split.model_dump_json())
    settings = SampleSettings(
        images_per_prompt=1, steps=1, guidance=7.5, resolution=32, precision="float32"
    )
    manifest = tmp_path / "images" / "manifest.parquet"

    def sample(settings):
        sample_run(
            split_path=str(split_path),
            method="sd",
            settings=settings,
            runtime=SampleRuntime(batch_size=64, device="cpu"),
            model=tiny_model,
            seed=1,
            delta=None,
            manifest=str(manifest),
        )

    sample(settings)
    stale = manifest.parent / "stale.png"
    stale.write_bytes(b"x")
    sample(settings)
    assert stale.exists()  # same job retried: kept
    sample(settings.model_copy(update={"steps": 2}))
    assert not stale.exists()  # new settings: folder cleared
    frame = pd.read_parquet(manifest)
    assert {"method", "concept", "group", "prompt", "seed", "path"} <= set(frame.columns)
    assert len(frame) == 31


def test_images_are_drawn_with_the_configured_sampler(tiny_model, cat_split, tmp_path):
    """SD v1.4 ships PNDM (the tiny model saves its config verbatim); the paper samples with
    DDIM: the sampler is built from the model's own config and named beside the images."""
    config = json.loads((Path(tiny_model) / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "PNDMScheduler" and config["steps_offset"] == 1
    split_path = tmp_path / "split.json"
    split_path.write_text(cat_split.model_dump_json())
    records = {}
    for name in ("ddim", "pndm"):
        manifest = tmp_path / name / "manifest.parquet"
        sample_run(
            split_path=str(split_path),
            method="sd",
            settings=SampleSettings(
                images_per_prompt=1, steps=2, resolution=32, precision="float32", scheduler=name
            ),
            runtime=SampleRuntime(device="cpu"),
            model=tiny_model,
            seed=1,
            delta=None,
            manifest=str(manifest),
        )
        records[name] = json.loads((manifest.parent / "sampling.json").read_text())
        frame = pd.read_parquet(manifest)
        records[name]["first"] = (manifest.parent / frame["path"].iloc[0]).read_bytes()
    ddim = records["ddim"]["scheduler"]
    assert ddim["class"] == "DDIMScheduler"
    # From SD v1.4's config, not DDIM's defaults (set_alpha_to_one and clip_sample are true there).
    assert ddim["config"]["set_alpha_to_one"] is False and ddim["config"]["clip_sample"] is False
    assert ddim["config"]["steps_offset"] == 1
    assert records["pndm"]["scheduler"]["class"] == "PNDMScheduler"
    assert records["ddim"]["first"] != records["pndm"]["first"]


def _manifest(tmp_path, method, n=6):
    from PIL import Image

    rows = []
    for k in range(n):
        path = tmp_path / method / f"{k}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (k * 40 % 256, len(method) * 20, 7)).save(path)
        group = ["target", "coref_test", "retain_test"][k % 3]
        rows.append({"method": method, "concept": "cat", "concept_text": "cat", "category": "object", "group": group,
                     "prompt": f"p{k % 3}", "image_index": k, "seed": k, "path": str(path)})  # fmt: skip
    out = tmp_path / f"{method}.parquet"
    pd.DataFrame(rows).to_parquet(out)
    return str(out)


JUDGE = JudgeSettings(
    model="fake-judge", prompt="Same concept as <X>? yes or no.", prompt_version="v1"
)
SERVE = f"{{python}} {FAKE_SERVER} --port {{port}} --model {{model}}"
RUNTIME = JudgeRuntime(serve=SERVE, concurrency=4, max_retries=2, timeout=10)


def test_fake_rejects_what_vllm_rejects(fake_server, tmp_path):
    server = fake_server(model="fake-judge")
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "i.png")
    good = request_body("fake-judge", tmp_path / "i.png", "q")
    body = {k: v for k, v in good.items() if k != "extra_body"} | good["extra_body"]
    url = f"{server.base_url}/chat/completions"
    assert httpx2.post(url, json=body).status_code == 200
    bad = [
        {**body, "top_logprobs": 21},
        {**body, "logprobs": False},
        {**body, "model": "other"},
        {**body, "messages": [{"role": "user", "content": body["messages"][0]["content"] * 2}]},
    ]
    for request in bad:
        assert httpx2.post(url, json=request).status_code in (400, 404), request.keys()
    # vLLM 0.33 accepts a field it no longer knows (guided_choice, removed in 0.12), ignores it
    # with a warning and leaves the answer unconstrained: so does the fake, and it counts it.
    old = {**{k: v for k, v in body.items() if k != "structured_outputs"},
           "guided_choice": ["yes", "no"]}  # fmt: skip
    assert httpx2.post(url, json=old).status_code == 200
    stats = httpx2.get(server.base_url.removesuffix("/v1") + "/stats").json()
    assert stats["ignored"] == {"guided_choice": 1}


@pytest.mark.parametrize("structured", ["choice", "none"])
def test_the_judge_sends_no_field_the_pinned_vllm_ignores(fake_server, tmp_path, structured):
    """Every field of the judge's requests is one vLLM 0.33 reads (the fake counts the ones
    it would ignore, as the test above shows it does)."""
    server = fake_server(model="fake-judge")
    manifests = {"sd": _manifest(tmp_path, "sd")}
    settings = JUDGE.model_copy(update={"structured_output": structured})
    judge_manifests(manifests, {"sd": str(tmp_path / "o.parquet")}, settings=settings,
                    runtime=JudgeRuntime(base_url=server.base_url, max_retries=1),
                    cache_path=tmp_path / "c.jsonl", progress=False)  # fmt: skip
    stats = httpx2.get(server.base_url.removesuffix("/v1") + "/stats").json()
    assert stats["judge"] >= 6 and stats["ignored"] == {}


def test_judging_answers_and_caches(tmp_path):
    manifests = {"sd": _manifest(tmp_path, "sd"), "crce": _manifest(tmp_path, "crce")}
    outputs = {m: str(tmp_path / "j" / f"{m}.parquet") for m in manifests}
    cache = tmp_path / "cache.jsonl"

    def judge(settings=JUDGE):
        judge_manifests(
            manifests, outputs, settings=settings, runtime=RUNTIME, cache_path=cache, progress=False
        )

    judge()
    frame = pd.read_parquet(outputs["sd"])
    assert len(frame) == 6 and set(frame["answer"]) <= {"yes", "no"}
    assert ((frame["p_yes"] >= 0.5) == (frame["answer"] == "yes")).all()
    assert set(frame["judge_model"]) == {"fake-judge"} and set(frame["prompt_version"]) == {"v1"}
    assert list(frame["question"]) == ["cat", "cat", "p2"] * 2  # retains: asked about themselves
    assert len(cache.read_text().splitlines()) == 12
    # A third method: only its 6 new images are sent.
    manifests["esd-x"] = _manifest(tmp_path, "esd-x")
    outputs["esd-x"] = str(tmp_path / "j" / "esd-x.parquet")
    judge()
    assert len(cache.read_text().splitlines()) == 18
    # A new prompt version re-judges everything.
    judge(JUDGE.model_copy(update={"prompt_version": "v2"}))
    assert len(cache.read_text().splitlines()) == 36


def test_killing_the_server_loses_no_judged_row(tmp_path):
    import openai

    manifests = {"sd": _manifest(tmp_path, "sd", n=30)}
    outputs = {"sd": str(tmp_path / "j" / "sd.parquet")}
    cache = tmp_path / "cache.jsonl"
    dying = RUNTIME.model_copy(update={"concurrency": 1, "serve": SERVE + " --die-after 10"})
    # Dies after 10, is restarted once, dies after 10 more: the job fails with 20 rows kept.
    with pytest.raises(openai.APIConnectionError):
        judge_manifests(
            manifests, outputs, settings=JUDGE, runtime=dying, cache_path=cache, progress=False
        )
    kept = [json.loads(line) for line in cache.read_text().splitlines()]
    assert len(kept) == 20 and len({r["key"] for r in kept}) == 20
    # The retried job judges only the 10 missing images.
    judge_manifests(
        manifests, outputs, settings=JUDGE, runtime=RUNTIME, cache_path=cache, progress=False
    )
    rows = [json.loads(line) for line in cache.read_text().splitlines()]
    assert len(rows) == 30 and len({r["key"] for r in rows}) == 30
    assert len(pd.read_parquet(outputs["sd"])) == 30


def test_cache_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"key": "a", "answer": "yes"}) + "\n" + '{"key": "b", "ans')
    cache = JudgmentCache(path)
    assert "a" in cache and "b" not in cache
    cache.close()


def judged(method, concept, category, group, answers):
    return [{"method": method, "concept": concept, "category": category, "group": group,
             "answer": a, "p_yes": 1.0 if a == "yes" else 0.0} for a in answers]  # fmt: skip


def test_metrics_and_table_layout_on_known_answers():
    rows = []
    rows += judged("sd", "cat", "object", "target", ["yes"] * 4)
    rows += judged("sd", "dog", "object", "target", ["yes", "no", "no", "no"])
    rows += judged("crce", "cat", "object", "target", ["no"] * 4)
    rows += judged("crce", "dog", "object", "retain_test", ["yes", "yes", "no", "no"])
    rows += judged("crce", "batman", "ip", "coref_train", ["yes", "no"])
    rows += judged("mine", "cat", "object", "target", ["yes", "no"])
    labels = {"crce": "CRCE", "sd": "SD", "mine": "My method"}
    metrics = compute_metrics(pd.DataFrame(rows), labels)
    sd_dog = metrics[(metrics.method == "sd") & (metrics.concept == "dog")].iloc[0]
    assert sd_dog["accuracy"] == 0.25 and sd_dog["n"] == 4 and sd_dog["metric"] == "Acc_U"
    assert (
        math.isclose(sd_dog["ci_low"], wilson(1, 4)[0])
        and sd_dog["ci_low"] < 0.25 < sd_dog["ci_high"]
    )
    table = table1(metrics, ["crce", "mine", "sd"], labels)
    assert list(table["method"]) == ["SD", "CRCE", "My method"]  # paper order, extras last
    assert list(table.columns[:6]) == [
        "method",
        "object/Acc_U",
        "object/Acc_C_train",
        "object/Acc_C_test",
        "object/Acc_R_train",
        "object/Acc_R_test",
    ]
    assert len(table.columns) == 11  # celebrity absent from the sheet: left out
    row = table.set_index("method")
    assert row.loc["SD", "object/Acc_U"] == 62.5  # mean over concepts of 100% and 25%
    assert (
        row.loc["CRCE", "object/Acc_R_test"] == 50.0 and row.loc["CRCE", "ip/Acc_C_train"] == 50.0
    )
    vs = versus_paper(table)
    cell = vs[(vs.method == "SD") & (vs.category == "object") & (vs.metric == "Acc_U")].iloc[0]
    assert cell["paper"] == 83.33 and cell["difference"] == round(62.5 - 83.33, 2)
    assert set(vs["method"]) == {"SD", "CRCE"}


def test_wilson_interval():
    low, high = wilson(8, 10)
    assert math.isclose(low, 0.4902, abs_tol=1e-4) and math.isclose(high, 0.9433, abs_tol=1e-4)
    assert wilson(0, 10)[0] == 0.0


def test_table2_distances_are_on_normalised_embeddings(tiny_model, cat_split, tmp_path):
    """The paper's Euclidean column is sqrt(2 - 2 cos) on every row: distances on unit
    vectors. Checked on the pipeline's own output file, for both embeddings it reports."""
    from crce.clip import run

    split_path = tmp_path / "split.json"
    split_path.write_text(cat_split.model_dump_json())
    run(split_path=str(split_path), pretrained=tiny_model, output=str(tmp_path / "d.csv"))
    table = pd.read_csv(tmp_path / "d.csv")
    assert len(table) == 30
    for cos, euc in (("cosine", "euclidean"), ("cosine_tokens", "euclidean_tokens")):
        expected = (2 - 2 * table[cos]).clip(lower=0) ** 0.5
        assert ((table[euc] - expected).abs() < 1e-4).all(), cos
        assert table[cos].between(-1, 1).all() and table[cos].nunique() > 1


def test_table2_beside_the_papers_rows():
    from crce.metrics import table2_versus_paper
    from crce.paper import PAPER_TABLE2

    ours = pd.DataFrame(
        [
            {"group": "coref_train", "text": "pooch", "cosine": 0.5, "euclidean": 1.0},
            {"group": "retain_train", "text": "bush dog", "cosine": 0.4, "euclidean": 1.1},
        ]
    )
    table = table2_versus_paper(ours, "dog").set_index("text")
    assert len(table) == 31  # the paper's 30 rows and our one extra
    assert table.loc["pooch", "paper_cosine"] == 0.9166 and table.loc["pooch", "cosine"] == 0.5
    assert math.isnan(table.loc["cat", "cosine"]) and table.loc["cat", "kind"] == "retain"
    assert math.isnan(table.loc["bush dog", "paper_cosine"])
    for items in PAPER_TABLE2["dog"].values():
        for cos, euc in items.values():  # the paper's own numbers obey the identity
            assert abs(euc - (2 - 2 * cos) ** 0.5) < 1e-3


def test_versus_paper_carries_every_paper_row_we_have():
    from crce.paper import PAPER_TABLE1

    labels = list(PAPER_TABLE1)
    table = pd.DataFrame([{"method": m, "object/Acc_U": 10.0} for m in labels + ["Mine"]])
    vs = versus_paper(table)
    assert sorted(set(vs["method"])) == sorted(labels)
    mace = vs[(vs.method == "MACE") & (vs.metric == "Acc_U") & (vs.category == "object")]
    assert mace["paper"].item() == 2.10 and mace["difference"].item() == round(10.0 - 2.10, 2)


def test_an_exported_folder_draws_the_samplers_images(tiny_model, cat_split, tmp_path):
    """Base + delta saved as a full pipeline: StableDiffusionPipeline.from_pretrained gives
    the images the workflow's own sampler draws for the same seeds and batch composition."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    from crce.export import export
    from crce.sample import load_erased_pipeline, set_scheduler

    pipe = load_pipeline(tiny_model)
    delta = {
        n: p.detach() * 20  # a change the tiny model's images show
        for n, p in pipe.unet.named_parameters()
        if ".attn2.to_k." in n or ".attn2.to_v." in n
    }
    save_file({k: v.contiguous() for k, v in delta.items()}, tmp_path / "delta.safetensors")
    settings = SampleSettings(steps=3, resolution=32, precision="float32")
    folder = export(tiny_model, str(tmp_path / "delta.safetensors"), settings,
                    tmp_path / "exported", {"method": "m"})  # fmt: skip
    plan = plan_images(cat_split, method="m", seed=3, images_per_prompt=2).head(6)
    kw = dict(steps=3, guidance=7.5, resolution=32, batch_size=4, progress=False)
    ours = load_erased_pipeline(
        tiny_model, str(tmp_path / "delta.safetensors"), dtype=torch.float32, device="cpu"
    )
    set_scheduler(ours, "ddim")
    sample_images(ours, plan, tmp_path / "ours", **kw)
    loaded = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    sample_images(loaded, plan, tmp_path / "loaded", **kw)
    for path in plan["path"]:
        assert (tmp_path / "ours" / path).read_bytes() == (tmp_path / "loaded" / path).read_bytes()
    base, base_image = load_pipeline(tiny_model), tmp_path / "base"
    set_scheduler(base, "ddim")
    sample_images(base, plan.head(4), base_image, **kw)  # the delta changed the images
    first = plan["path"].iloc[0]
    assert (base_image / first).read_bytes() != (tmp_path / "ours" / first).read_bytes()


def test_a_judge_behind_a_plain_chat_api(tmp_path):
    """A server that answers like most chat APIs and rejects vLLM's fields: with
    structured_output none, "Yes." and "No, ..." are read by their first word, an unreadable
    answer is asked once more, and one that stays unreadable is an `invalid` row, counted."""
    import openai

    manifests = {"sd": _manifest(tmp_path, "sd", n=40)}
    outputs = {"sd": str(tmp_path / "j" / "sd.parquet")}
    chat = RUNTIME.model_copy(update={"serve": SERVE + " --chat"})
    with pytest.raises(openai.BadRequestError, match="structured_outputs"):
        judge_manifests(manifests, outputs, settings=JUDGE, runtime=chat,
                        cache_path=tmp_path / "vllm.jsonl", progress=False)  # fmt: skip
    plain = JUDGE.model_copy(update={"structured_output": "none"})
    judge_manifests(manifests, outputs, settings=plain, runtime=chat,
                    cache_path=tmp_path / "c.jsonl", progress=False)  # fmt: skip
    frame = pd.read_parquet(outputs["sd"])
    assert len(frame) == 40 and set(frame["answer"]) <= {"yes", "no", "invalid"}
    readable = frame[frame["answer"] != "invalid"]
    assert {"Yes.", "No, the image shows something else."} <= set(readable["raw_answer"])
    assert ((readable["raw_answer"] == "Yes.") == (readable["answer"] == "yes")).all()
    invalid = frame[frame["answer"] == "invalid"]
    assert len(invalid) > 0 and set(invalid["raw_answer"]) == {"I cannot tell."}
    assert invalid["p_yes"].isna().all()
    # The numbers behind the table: accuracy over readable answers, invalid counted apart.
    frame["concept"], frame["category"] = "cat", "object"
    metrics = compute_metrics(frame, {"sd": "SD"})
    assert metrics["n"].sum() == len(readable) and metrics["n_invalid"].sum() == len(invalid)


def test_a_judge_answer_is_read_by_its_first_word():
    from crce.judge import read_answer

    assert read_answer("Yes.") == "yes" and read_answer(" no, it is a dog") == "no"
    assert read_answer("YES") == "yes" and read_answer("**No**") == "no"
    assert read_answer("I cannot tell.") is None and read_answer("") is None
    assert read_answer("Nope") is None  # a first word, not a prefix


def test_retains_split_by_distance_to_the_target():
    from crce.metrics import retains_by_distance

    distances = pd.DataFrame(
        [
            {"id": "cat", "group": "retain_train", "text": t, "cosine": c}
            for t, c in (("tiger", 0.9), ("lynx", 0.8), ("truck", 0.3), ("cloud", 0.2))
        ]
        + [{"id": "cat", "group": "coref_train", "text": "kitty", "cosine": 0.95}]
    )
    rows = []
    for method, answers in (("sd", "yyyy"), ("esd-x", "nnyy"), ("crce", "ynyy")):
        for text, a in zip(("tiger", "lynx", "truck", "cloud"), answers, strict=True):
            rows += judged(method, "cat", "object", "retain_test", ["yes" if a == "y" else "no"])
            rows[-1]["prompt"] = text
    rows += judged("sd", "cat", "object", "coref_train", ["yes"])
    rows[-1]["prompt"] = "kitty"
    table = retains_by_distance(
        pd.DataFrame(rows), distances, {"sd": "SD", "esd-x": "ESD-x", "crce": "CRCE"}
    ).set_index("method")
    assert list(table.index) == ["SD", "ESD-x", "CRCE"]
    assert table.loc["SD", "Acc_R_close"] == 100.0 and table.loc["SD", "Acc_R_far"] == 100.0
    assert table.loc["ESD-x", "Acc_R_close"] == 0.0 and table.loc["ESD-x", "Acc_R_far"] == 100.0
    assert (
        table.loc["CRCE", "Acc_R_close"] == 50.0 and table.loc["CRCE", "close_minus_far"] == -50.0
    )
    assert table.loc["ESD-x", "images_close"] == 2 and table.loc["ESD-x", "images_far"] == 2
