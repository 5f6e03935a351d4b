"""VLM judging through an OpenAI-compatible server (vLLM serving Qwen2-VL by default).

Every answer is appended to a per-concept cache as soon as it arrives, keyed by (image
content hash, question, judge model, prompt version): a killed job, a dead server or a rerun
after adding a method or concept never loses a judged row nor judges it twice.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import os
import re
from pathlib import Path

import openai
import pandas as pd
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential
from tqdm import tqdm

from .constants import ANSWERS
from .files import inherit_sources
from .manifests import image_sha256, read_manifest
from .serving import TRANSIENT, call_served, openai_client, unreachable
from .settings import JudgeRuntime, JudgeSettings

log = logging.getLogger(__name__)

CHOICES = list(ANSWERS)


def judge_question(group: str, prompt: str, target: str, retain_question: str) -> str:
    """The concept <X> the judge is asked about: the target for target and coref images (does
    the erased concept still appear?), the retain's own text for retain images (is it still
    drawn?) unless `retain_question` is 'target'."""
    if group.startswith("retain") and retain_question == "retain":
        return prompt
    return target


def question_text(template: str, concept: str) -> str:
    return template.replace("<X>", concept)


def cache_key(sha: str, question: str, settings: JudgeSettings) -> str:
    """What makes an answer: the image, the question, the judge, its prompt and answer mode."""
    mode = [] if settings.structured_output == "choice" else [settings.structured_output]
    return json.dumps([sha, question, settings.model, settings.prompt_version, *mode])


class JudgmentCache:
    """Append-only JSON-lines file; each line is one judged image."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: dict[str, dict] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill: that image is judged again
                self.rows[row["key"]] = row
        self._handle = self.path.open("a", encoding="utf-8")

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def add(self, row: dict) -> None:
        self.rows[row["key"]] = row
        self._handle.write(json.dumps(row) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


def p_yes_from(choice) -> float | None:
    """P(yes) from the first token's top logprobs, normalised over the yes/no mass."""
    content = getattr(getattr(choice, "logprobs", None), "content", None)
    if not content:
        return None
    mass = {"yes": 0.0, "no": 0.0}
    for top in content[0].top_logprobs or []:
        token = top.token.strip().lower()
        if token in mass:
            mass[token] += math.exp(top.logprob)
    total = mass["yes"] + mass["no"]
    return mass["yes"] / total if total > 0 else None


REASK = " Answer with one word: yes or no."
INVALID = "invalid"  # an answer that stayed unreadable after one re-ask: counted, never dropped


def read_answer(text: str | None) -> str | None:
    """yes or no from a chat answer's first word, case and punctuation aside ("Yes.",
    "No, the image shows ..."); None when the first word is neither."""
    words = re.findall(r"[a-z]+", (text or "").lower())
    return words[0] if words and words[0] in CHOICES else None


def request_body(
    model: str, image_path: str | Path, question: str, structured: bool = True
) -> dict:
    """One yes/no question about one image. `structured`: vLLM's constrained choice (one token
    is the whole answer); else a plain chat request (any OpenAI-compatible API) with room for
    "Yes." or "No, ...", read by its first word."""
    encoded = base64.b64encode(Path(image_path).read_bytes()).decode()
    body = {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{encoded}"}},
                    {"type": "text", "text": question},
                ],
            }
        ],
        "max_tokens": 1 if structured else 8,
        "temperature": 0.0,
        "logprobs": True,
        "top_logprobs": 20,
    }
    if structured:  # vLLM's constrained decoding (guided_choice was removed in vLLM 0.12)
        body["extra_body"] = {"structured_outputs": {"choice": CHOICES}}
    return body


async def _judge_rows(
    rows: list[dict],
    *,
    base_url: str,
    settings: JudgeSettings,
    runtime: JudgeRuntime,
    cache: JudgmentCache,
    progress: bool,
) -> None:
    client = openai_client(
        base_url,
        api_key_env=runtime.api_key_env,
        timeout=runtime.timeout,
        asynchronous=True,
    )
    semaphore = asyncio.Semaphore(runtime.concurrency)
    bar = tqdm(total=len(rows), disable=not progress, unit="img")

    structured = settings.structured_output == "choice"

    async def ask(row: dict, question: str):
        async with semaphore:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(TRANSIENT),
                stop=stop_after_attempt(runtime.max_retries),
                wait=wait_exponential(multiplier=0.2, max=5),
                reraise=True,
            ):
                with attempt:
                    return await client.chat.completions.create(
                        **request_body(settings.model, row["path"], question, structured)
                    )

    async def one(row: dict) -> None:
        choice = (await ask(row, row["question_text"])).choices[0]
        raw = choice.message.content
        answer = read_answer(raw)
        if answer is None:  # once more, asking for the one word
            choice = (await ask(row, row["question_text"] + REASK)).choices[0]
            raw, answer = choice.message.content, read_answer(choice.message.content)
        if answer is None:
            log.warning("unreadable judge answer %r for %s: recorded as invalid", raw, row["path"])
        p_yes = None
        if answer:  # the yes probability from logprobs, else the answer itself (0 or 1)
            p_yes = p_yes_from(choice)
            if p_yes is None:
                p_yes = float(answer == "yes")
        cache.add(
            {
                "key": row["key"],
                "answer": answer or INVALID,
                "p_yes": p_yes,
                "raw_answer": raw,
                "judge_model": settings.model,
                "prompt_version": settings.prompt_version,
            }
        )
        bar.update()

    try:
        async with asyncio.TaskGroup() as group:
            for row in rows:
                group.create_task(one(row))
    finally:
        bar.close()
        await client.close()


def judge_manifests(
    manifests: dict[str, str],
    outputs: dict[str, str],
    *,
    settings: JudgeSettings,
    runtime: JudgeRuntime,
    cache_path: str | Path,
    server_log: str | Path | None = None,
    progress: bool = True,
) -> None:
    """Judge every image of a concept's manifests (all methods, `{method: manifest}`) with
    one server start; write each method's judgments to `outputs[method]`."""
    if set(manifests) != set(outputs):
        raise ValueError(f"manifests of {sorted(manifests)}, outputs for {sorted(outputs)}")
    frames = {method: read_manifest(path) for method, path in manifests.items()}
    everything = pd.concat(frames.values(), ignore_index=True)
    if "image_sha256" not in everything.columns:  # a manifest of an older sampler
        everything["image_sha256"] = [image_sha256(p) for p in everything["path"]]
    everything["question"] = [
        judge_question(g, p, t, settings.retain_question)
        for g, p, t in zip(
            everything["group"], everything["prompt"], everything["concept_text"], strict=True
        )
    ]
    everything["question_text"] = [
        question_text(settings.prompt, q) for q in everything["question"]
    ]
    everything["key"] = [
        cache_key(sha, q, settings)
        for sha, q in zip(everything["image_sha256"], everything["question_text"], strict=True)
    ]
    cache = JudgmentCache(cache_path)
    try:
        pending = [r for r in everything.to_dict("records") if r["key"] not in cache]
        unique = list({r["key"]: r for r in pending}.values())
        log.info(
            "%d images, %d already judged, %d to judge",
            len(everything),
            len(everything) - len(pending),
            len(unique),
        )
        if unique:
            _judge_with_server(unique, settings, runtime, cache, server_log, progress)
    finally:
        cache.close()
    answers = pd.DataFrame([cache.rows[k] for k in everything["key"]])
    judged = pd.concat([everything.drop(columns=["key"]), answers.drop(columns=["key"])], axis=1)
    for method, output in outputs.items():
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        judged[judged["method"] == method].to_parquet(output, index=False)
        inherit_sources(output, manifests[method])  # the judgments are of that delta's images


def _run(coroutine) -> None:
    """asyncio.run that surfaces the first failure of a task group as itself."""
    try:
        asyncio.run(coroutine)
    except ExceptionGroup as group:
        first = group.exceptions[0]
        while isinstance(first, ExceptionGroup):
            first = first.exceptions[0]
        raise first from None


def _judge_with_server(rows, settings, runtime, cache, server_log, progress) -> None:
    def judge_unjudged(base_url):
        pending = [r for r in rows if r["key"] not in cache]
        try:
            _run(_judge_rows(pending, base_url=base_url, settings=settings, runtime=runtime,
                             cache=cache, progress=progress))  # fmt: skip
        except openai.APIConnectionError as err:
            raise unreachable(err, base_url, "judge") from err

    call_served(judge_unjudged, runtime=runtime, model=settings.model, log_path=server_log)
