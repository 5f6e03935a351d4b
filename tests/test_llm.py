import json

import httpx2
import pytest

from crce.concepts import Concept
from crce.llm import LLMError, generate_lists, parse_answer, violations
from crce.serving import ManagedServer, ServerError, call_served, free_port
from crce.settings import ListSettings, LlmRuntime

CAT = Concept(id="bat-animal", text="bat (animal)", category="object")


SETTINGS = ListSettings(model="fake")


def requests_seen(server) -> int:
    """List requests the fake server received (its /stats)."""
    return httpx2.get(server.base_url.removesuffix("/v1") + "/stats").json()["list"]


def runtime(**kw):
    return LlmRuntime(
        **{**dict(max_attempts=3, max_retries=3, retry_wait_max=0.05, timeout=10), **kw}
    )


@pytest.mark.parametrize("structured", ["json_schema", "json_object", "none"])
def test_list_requests_send_no_field_the_pinned_vllm_ignores(fake_server, structured):
    server = fake_server(["good"])
    settings = SETTINGS.model_copy(update={"structured_output": structured})
    generate_lists(CAT, settings, runtime(), server.base_url)
    stats = httpx2.get(server.base_url.removesuffix("/v1") + "/stats").json()
    assert stats["list"] == 1 and stats["ignored"] == {}


def test_good_lists(fake_server):
    server = fake_server(["good"])
    lists = generate_lists(CAT, SETTINGS, runtime(), server.base_url)
    assert len(lists.corefs) == 15 and len(lists.retains) == 15
    assert lists.provenance.source == "llm" and lists.provenance.attempts == 1
    assert lists.provenance.prompt_version and lists.provenance.raw_response
    assert lists.corefs[0].text.startswith("bat (animal)")


@pytest.mark.parametrize(
    "bad", ["malformed", "short", "duplicates", "target", "article", "overlap"]
)
def test_rule_violations_are_re_asked(fake_server, bad):
    server = fake_server([bad, "good"])
    lists = generate_lists(CAT, SETTINGS, runtime(), server.base_url)
    assert lists.provenance.attempts == 2 and requests_seen(server) == 2
    assert not violations(parse_answer(lists.provenance.raw_response), CAT.text)


def test_fenced_json_is_accepted(fake_server):
    server = fake_server(["fenced"])
    lists = generate_lists(CAT, SETTINGS, runtime(), server.base_url)
    assert lists.provenance.attempts == 1 and len(lists.corefs) == 15


@pytest.mark.parametrize("transient", ["error500", "error429"])
def test_transient_errors_are_retried(fake_server, transient):
    server = fake_server([transient, transient, "good"])
    lists = generate_lists(CAT, SETTINGS, runtime(), server.base_url)
    assert lists.provenance.attempts == 1  # transport retries are not re-asks...
    assert requests_seen(server) == 3  # ...but each was a request


def test_slow_answer_times_out_then_retries(fake_server, monkeypatch):
    monkeypatch.setenv("FAKE_SLOW_SECONDS", "3")
    server = fake_server(["slow", "good"])
    lists = generate_lists(CAT, SETTINGS, runtime(timeout=1.0), server.base_url)
    assert len(lists.corefs) == 15 and requests_seen(server) == 2


def test_bounded_attempts_then_clear_error(fake_server):
    server = fake_server(["short"] * 5)
    with pytest.raises(LLMError, match=r"bat \(animal\).*no valid answer after 2 attempts.*corefs"):
        generate_lists(CAT, SETTINGS, runtime(max_attempts=2), server.base_url)
    assert requests_seen(server) == 2


def test_unreachable_llm_names_the_concept():
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(LLMError, match=r"'bat \(animal\)'.*no LLM answered"):
        generate_lists(CAT, SETTINGS, runtime(max_retries=2), url)


def test_violations_listed():
    data = {
        "corefs": [{"text": f"c{i}", "certainty": "High"} for i in range(14)]
        + [{"text": "Bat (Animal)", "certainty": "Low"}],
        "retains": [{"text": "c1", "certainty": "High"}] * 2
        + [{"text": f"r{i}", "certainty": "Low"} for i in range(12)],
    }
    problems = violations(parse_answer(json.dumps(data)), CAT.text)
    text = " | ".join(problems)
    assert "target" in text and "retains' has 14 items" in text and "repeats 'c1'" in text
    assert "both lists" in text


def test_api_key_never_reaches_outputs(fake_server, tmp_path, monkeypatch):
    secret = "sk-test-SECRET-123"
    monkeypatch.setenv("MY_KEY", secret)
    server = fake_server(["malformed", "good"])
    from crce.lists import write_model

    lists = generate_lists(CAT, SETTINGS, runtime(api_key_env="MY_KEY"), server.base_url)
    write_model(lists, tmp_path / "out.json")
    assert secret not in (tmp_path / "out.json").read_text()
    assert secret not in (tmp_path / "server.log").read_text()


def test_server_that_exits_fails_fast(tmp_path):
    server = ManagedServer(
        "echo boom; exit 3", "m", startup_timeout=30, log_path=tmp_path / "s.log"
    )
    with pytest.raises(ServerError, match="exited with code 3.*boom"):
        server.start()


def test_server_deadline(tmp_path):
    server = ManagedServer("sleep 30", "m", startup_timeout=1, log_path=tmp_path / "s.log")
    with pytest.raises(ServerError, match="did not answer"):
        server.start()
    assert server.process is None


def test_a_served_job_stops_the_process_group(tmp_path):
    from helpers import FAKE_SERVER

    command = f"{{python}} {FAKE_SERVER} --port {{port}} --model {{model}}"
    url = call_served(
        lambda url: url, runtime=LlmRuntime(serve=command, startup_timeout=30), model="m"
    )
    assert url.startswith("http://127.0.0.1:")
    port = int(url.split(":")[2].split("/")[0])
    import socket

    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0


def test_paraphrases_never_name_the_target_or_a_coref(fake_server):
    from crce.llm import generate_paraphrases, paraphrase_violations

    server = fake_server(["names_target", "good"])
    prompts, raw, attempts = generate_paraphrases(
        CAT, ["flying mammal"], 4, SETTINGS, runtime(), server.base_url
    )
    assert attempts == 2 and requests_seen(server) == 2  # the first named the target: re-asked
    assert len(prompts) == 4 and not paraphrase_violations(prompts, 4, CAT.text, ["flying mammal"])
    assert paraphrase_violations(["a bat (animal) at night"] * 4, 4, CAT.text, []) != []
    problems = paraphrase_violations(["a Flying Mammal", "b", "c"], 4, CAT.text, ["flying mammal"])
    assert any("exactly 4" in p for p in problems) and any("flying mammal" in p for p in problems)


def test_an_anchor_is_a_short_phrase_that_is_neither_the_target_nor_a_coref(fake_server):
    from crce.llm import generate_anchor

    server = fake_server(["anchor_target", "anchor_long", "good"])
    found, raw, attempts = generate_anchor(CAT, ["flying mammal"], 3, SETTINGS, runtime(),
                                           server.base_url)  # fmt: skip
    assert attempts == 3 and requests_seen(server) == 3  # the target, then 6 words: re-asked
    assert found["anchor"] == "animal" and len(found["captions"]) == 3
    assert all("animal" in c for c in found["captions"])


def test_no_anchor_after_the_re_asks_is_an_error_naming_the_concept(fake_server):
    from crce.llm import LLMError, generate_anchor

    server = fake_server(["anchor_target"] * 10)
    with pytest.raises(LLMError, match=r"concept 'bat \(animal\)' \(bat-animal\) anchor: no "
                                       r"valid answer after \d+ attempts.*is the target"):  # fmt: skip
        generate_anchor(CAT, [], 3, SETTINGS, runtime(), server.base_url)


def test_anchor_rules():
    from crce.llm import _Anchor, anchor_violations

    def problems(anchor, captions, corefs=()):
        return anchor_violations(_Anchor(anchor=anchor, captions=captions), 2, "Grumpy Cat",
                                 list(corefs))  # fmt: skip

    assert problems("cat", ["a cat", "a cat asleep"]) == []
    assert any("target" in p for p in problems("the grumpy cat", ["the grumpy cat", "x"]))
    assert any("means the target" in p for p in problems("Tard", ["Tard 1", "Tard 2"], ["tard"]))
    assert any("does not contain" in p for p in problems("cat", ["a cat", "a dog"]))
    assert any("exactly 2" in p for p in problems("cat", ["a cat"]))


def test_a_server_that_wants_a_key_fails_at_once_naming_the_variable(tmp_path, monkeypatch):
    """A started vLLM inherits VLLM_API_KEY and then checks keys on /v1: the readiness probe
    sends the key the config names, and a 401 is an error in seconds, not a wait for the whole
    startup timeout."""
    import time

    from helpers import FAKE_SERVER

    command = f"{{python}} {FAKE_SERVER} --port {{port}} --model {{model}} --api-key s3cret"
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    server = ManagedServer(command, "m", startup_timeout=600, log_path=tmp_path / "s.log",
                           api_key_env="VLLM_API_KEY")  # fmt: skip
    began = time.monotonic()
    with pytest.raises(ServerError, match="wants an API key: set VLLM_API_KEY") as caught:
        server.start()
    assert time.monotonic() - began < 30 and "s3cret" not in str(caught.value)
    assert server.process is None  # stopped
    monkeypatch.setenv("VLLM_API_KEY", "s3cret")
    try:
        assert server.start().endswith("/v1")  # the same probe, with the key: ready
    finally:
        server.stop()


def test_an_unreachable_judge_names_its_endpoint(tmp_path):
    import pandas as pd
    from PIL import Image

    from crce.judge import judge_manifests
    from crce.settings import JudgeRuntime, JudgeSettings

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    row = {"method": "sd", "concept": "cat", "concept_text": "cat", "category": "object",
           "group": "target", "prompt": "cat", "image_index": 0, "seed": 0,
           "path": str(tmp_path / "a.png")}  # fmt: skip
    pd.DataFrame([row]).to_parquet(tmp_path / "m.parquet")
    settings = JudgeSettings(model="j", prompt="<X>?", prompt_version="1")
    runtime = JudgeRuntime(base_url="http://127.0.0.1:9/v1", max_retries=1, timeout=2)
    with pytest.raises(Exception, match=r"no judge answered at http://127.0.0.1:9/v1"):
        judge_manifests({"sd": str(tmp_path / "m.parquet")}, {"sd": str(tmp_path / "o.parquet")},
                        settings=settings, runtime=runtime, cache_path=tmp_path / "c.jsonl",
                        progress=False)  # fmt: skip


def test_an_article_or_case_does_not_hide_the_target_or_an_overlap():
    from fake_openai_server import good_lists

    from crce.llm import _Answer

    data = good_lists("zebra")
    data["corefs"][0]["text"] = "a Zebra"
    data["retains"][0]["text"] = "The  zebra alias 3"  # coref "zebra alias 3", another case
    problems = violations(_Answer.model_validate(data), "zebra")
    assert any("contains the target 'zebra' itself (as 'a Zebra')" in p for p in problems)
    assert any("in both lists: 'zebra alias 3'" in p for p in problems)
    data = good_lists("zebra")
    data["corefs"][1]["text"] = "a zebra alias 0"  # beside "zebra alias 0": another prompt
    assert violations(_Answer.model_validate(data), "zebra") == []
