"""adaskip-rag on Ray Serve against ``adaskip-rag serve``, default model, on this machine, in one run.

1. The Ray ingress's cost: one request at a time, a RAG prompt of about --tokens tokens, time to first token through
   Ray Serve (1 replica, --threads torch threads) and through ``adaskip-rag serve`` (--threads threads), the two
   alternating --rounds times with --pause seconds between: medians, and the median of the per-round differences
   as a share of the plain server's TTFT (target: under 10 %).
2. Scaling: --concurrency requests at once through Ray Serve with 1 replica of --threads threads, then 2 replicas
   of --threads / 2 threads each (the same cores): throughput (tokens generated per second), median of --rounds.
Full model on every side (``skip=False``), greedy answers of up to --max-tokens tokens.

    python benchmarks/bench_ray.py [--tokens 2000] [--rounds 5] [--concurrency 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time

import openai
import ray
import torch
from bench_data import items
from bench_http import percentile, round_of, timed
from ray import serve
from transformers import AutoTokenizer

from adaskip_rag import loading
from adaskip_rag.corpora import rag_messages
from adaskip_rag.server.process import ServerProcess
from adaskip_rag.server.ray_app import RayOptions, deployment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pause", type=float, default=1.0)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(loading.default_model_path())
    prompts = [rag_messages(q.document, q.question) for q in items("squad", args.tokens, args.concurrency, tokenizer)]
    plain = ServerProcess(["--max-batch-size", str(args.concurrency)], cli_args=["--threads", str(args.threads)])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    clients = {
        "serve": openai.OpenAI(base_url=f"{plain.url}/v1", api_key="-", max_retries=0, timeout=600),
        "Ray": openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=600),
    }
    model = loading.model_label("default")

    def ask(side: str):
        def one(messages: list[dict]) -> tuple[float, float, int]:
            start = time.perf_counter()
            stream = clients[side].chat.completions.create(
                model=model, messages=messages, max_tokens=args.max_tokens, temperature=0, stream=True,
                extra_body={"adaskip": {"skip": False}},
            )  # fmt: skip
            return timed((c.choices[0].delta.content or "" for c in stream if c.choices), start)

        return one

    try:
        print(f"command: {' '.join(sys.argv)}")
        print(
            f"model: {model}; {args.threads} threads in all per side; prompts of about {args.tokens} tokens, answers "
            f"up to {args.max_tokens} tokens; torch {torch.__version__}, Ray {ray.__version__}\n"
        )
        serve.run(deployment(RayOptions(threads=args.threads, replicas=1)), name="adaskip", route_prefix="/")
        ask("Ray")(prompts[0]), ask("serve")(prompts[0])  # warm-up
        ttft: dict[str, list[float]] = {"serve": [], "Ray": []}
        for _ in range(args.rounds):
            for side in ttft:
                time.sleep(args.pause)
                ttft[side].append(ask(side)(prompts[0])[0])
        added = statistics.median(r - p for r, p in zip(ttft["Ray"], ttft["serve"]))
        base = statistics.median(ttft["serve"])
        print(
            f"one request at a time: TTFT adaskip-rag serve {base:.3f} s, Ray Serve (1 replica) "
            f"{statistics.median(ttft['Ray']):.3f} s; Ray adds {added * 1000:.1f} ms, {added / base:.1%} of TTFT "
            "(target: under 10 %)\n"
        )
        plain.stop()  # the scaling rounds have the cores to themselves
        for replicas in (1, 2):
            options = RayOptions(threads=max(1, args.threads // replicas), replicas=replicas)
            serve.delete("adaskip")  # the CPUs go to the new replicas (an update in place would wait for them)
            serve.run(deployment(options), name="adaskip", route_prefix="/")
            round_of(ask("Ray"), prompts)  # warm-up of the new replicas
            rates = []
            for _ in range(args.rounds):
                time.sleep(args.pause)
                done = round_of(ask("Ray"), prompts)
                rates.append(sum(r[2] for r in done["results"]) / done["seconds"])
            every = round_of(ask("Ray"), prompts)["results"]
            print(
                f"{args.concurrency} requests at once, {replicas} replica(s) of {options.threads} thread(s): "
                f"{statistics.median(rates):.1f} tokens/s, TTFT p50 {percentile([r[0] for r in every], 0.5):.2f} s"
            )
            sys.stdout.flush()
    finally:
        serve.shutdown()
        ray.shutdown()
        if plain.process.poll() is None:
            plain.stop()


if __name__ == "__main__":
    main()
