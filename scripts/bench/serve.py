"""Benchmark: requests/s and generated tokens/s of `python -m vltrain.serve` for 1 and for 8 concurrent clients.

Starts the real server in a subprocess (default: the demo's tiny model, random weights, `model=tiny`; or a
checkpoint with `--ckpt-dir`, e.g. the `make demo` run's), waits for it, then for each concurrency level sends
`--requests` chat requests through the official `openai` client from that many threads: each a demo image (a
224 px PNG data URI of coloured shapes) and a question, `max_tokens=--max-tokens`, greedy. Reports wall time,
requests/s, generated tokens/s (usage.completion_tokens), mean latency, and the speed-up of 8 clients over 1
(8 concurrent clients share `generate` calls; one at a time they cannot).

    python scripts/bench/serve.py [--ckpt-dir outputs/tiny/<run>/checkpoint-375] [--requests 32] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def start_server(args) -> tuple[subprocess.Popen, int, list[str]]:
    command = [sys.executable, "-m", "vltrain.serve", "port=0", f"max_batch_size={args.batch}",
               f"max_tokens={args.max_tokens}"]
    command += [f"ckpt_dir={args.ckpt_dir}"] if args.ckpt_dir else ["model=tiny"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    output: list[str] = []
    port: list[int] = []
    ready = threading.Event()

    def read():
        for line in process.stdout:
            output.append(line)
            if match := re.search(r"Uvicorn running on http://[\d.]+:(\d+)", line):
                port.append(int(match[1]))
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    while not ready.wait(0.5):
        if process.poll() is not None:
            sys.exit("the server did not start:\n" + "".join(output))
    return process, port[0], output


def demo_images(n: int) -> list[str]:
    from vltrain.data.demo import write_demo_dataset

    with tempfile.TemporaryDirectory() as folder:
        demo = write_demo_dataset(Path(folder), n_train=max(n, 8), n_val=2)
        images = sorted((demo.train.parent / "images").iterdir())[:n]
        return ["data:image/png;base64," + base64.b64encode(p.read_bytes()).decode("ascii") for p in images]


def run_level(client, model: str, images: list[str], concurrency: int, requests: int, max_tokens: int) -> dict:
    def one(i: int) -> tuple[float, int]:
        start = time.perf_counter()
        reply = client.chat.completions.create(
            model=model, max_tokens=max_tokens, temperature=0,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": images[i % len(images)]}},
                                                   {"type": "text", "text": f"How many shapes are there? ({i})"}]}])
        return time.perf_counter() - start, reply.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    tokens = sum(t for _, t in results)
    return {"clients": concurrency, "requests": requests, "wall_s": wall, "requests_per_s": requests / wall,
            "tokens_per_s": tokens / wall, "tokens": tokens, "mean_latency_s": sum(s for s, _ in results) / requests}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt-dir", help="a checkpoint to serve (default: the tiny demo model, random weights)")
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="the server's max_batch_size")
    parser.add_argument("--levels", default="1,8", help="concurrency levels, comma-separated")
    args = parser.parse_args()

    from openai import OpenAI

    process, port, _ = start_server(args)
    try:
        client = OpenAI(api_key="none", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        images = demo_images(8)
        run_level(client, model, images, 1, 2, args.max_tokens)  # warm-up
        rows = [run_level(client, model, images, int(c), args.requests, args.max_tokens)
                for c in args.levels.split(",")]
    finally:
        process.terminate()
        process.wait(timeout=60)
    print(f"model {model}, {args.requests} requests per level, max_tokens {args.max_tokens}, greedy, "
          f"max_batch_size {args.batch}")
    print(f"{'clients':>7} {'wall s':>8} {'requests/s':>11} {'tokens/s':>9} {'tokens':>7} {'mean latency s':>15}")
    for r in rows:
        print(f"{r['clients']:>7} {r['wall_s']:>8.2f} {r['requests_per_s']:>11.2f} {r['tokens_per_s']:>9.1f} "
              f"{r['tokens']:>7} {r['mean_latency_s']:>15.3f}")
    if len(rows) > 1:
        print(f"requests/s, {rows[-1]['clients']} clients over {rows[0]['clients']}: "
              f"{rows[-1]['requests_per_s'] / rows[0]['requests_per_s']:.2f}x")


if __name__ == "__main__":
    main()
