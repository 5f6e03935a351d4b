"""Judge client throughput against the local fake vLLM-shaped server (requests/s).

python bench/judge_client.py --images 400 --concurrency 1,8,32
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
FAKE_SERVER = ROOT / "tests" / "fake_openai_server.py"

from crce.judge import judge_manifests  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--latency", type=float, default=0.05, help="fake model seconds/request")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        records = []
        for k in range(args.images):
            path = tmp / f"{k}.png"
            Image.new("RGB", (32, 32), (k % 256, k // 256, 3)).save(path)
            records.append({"method": "sd", "concept": "cat", "concept_text": "cat", "category": "object",
                            "group": "target", "prompt": "cat", "question": "cat", "image_index": k,
                            "seed": k, "path": str(path)})  # fmt: skip
        pd.DataFrame(records).to_parquet(tmp / "m.parquet")
        for concurrency in map(int, args.concurrency.split(",")):
            settings = {
                "model": "fake-judge",
                "prompt": "Same concept as <X>?",
                "prompt_version": f"bench-{concurrency}",
                "concurrency": concurrency,
                "serve": f"{{python}} {FAKE_SERVER} --port {{port}} --model {{model}} --latency {args.latency}",
                "startup_timeout": 60,
            }
            start = time.perf_counter()
            judge_manifests({"sd": str(tmp / "m.parquet")}, {"sd": str(tmp / "sd.parquet")}, settings=settings,
                            cache_path=tmp / f"cache{concurrency}.jsonl", progress=False)  # fmt: skip
            elapsed = time.perf_counter() - start  # includes one server start
            rows.append({"concurrency": concurrency, "latency_s": args.latency, "images": args.images, "seconds": elapsed,
                         "requests_per_s": args.images / elapsed})  # fmt: skip
            print(json.dumps(rows[-1]))


if __name__ == "__main__":
    main()
