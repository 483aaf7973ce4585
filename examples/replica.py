"""One replica of a RAG answering service whose skip profiles live on a shared Chroma server.

Run two of these against one `chroma run` server (see docs/serving.md): they
share one warm-up and then skip the same sublayers.

    ADASKIP_PROFILE_STORE="chroma://127.0.0.1:8000?replica=a" python examples/replica.py --questions 12
"""

import argparse
import os
from collections import Counter

from adaskip_rag import AdaSkipEngine
from adaskip_rag.corpora import rag_messages, squad_questions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=30)
    parser.add_argument("--collection", default="squad-dev")
    args = parser.parse_args()
    if not os.environ.get("ADASKIP_PROFILE_STORE", "").startswith("chroma://"):
        raise SystemExit("set ADASKIP_PROFILE_STORE=chroma://HOST:PORT to share profiles through a Chroma server")

    engine = AdaSkipEngine.shared("default")
    store = engine.learner.store
    name = store.replica
    modes: Counter[str] = Counter()
    for i, (document, question) in enumerate(squad_questions(args.questions)):
        result = engine.generate(rag_messages(document, question), collection=args.collection, max_new_tokens=24)
        stats = result.stats
        modes[stats.mode] += 1
        print(
            f"[{name}] {i:3d} {stats.mode:7s} profile has {stats.queries_seen:3d} queries  "
            f"skipped attn {stats.skipped_attention} ffn {stats.skipped_ffn_prefill}  {result.text.strip()[:40]!r}"
        )
    print(
        f"[{name}] served {sum(modes.values())}: {dict(modes)}; "
        f"server {'unreachable' if store.degraded else 'reachable'}"
    )


if __name__ == "__main__":
    main()
