"""``adaskip-rag`` command line: ask questions about documents, and inspect the learned profiles."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import torch

from . import loading
from .compensation import fit, residual_error
from .corpora import rag_messages, squad_article, squad_questions
from .engine import AdaSkipEngine
from .learning import PROFILES
from .policies import AdaSkipPolicy, budget_count, top_k_plan
from .profiles import KINDS, Profile
from .qa import DEMO_COLLECTION, Library
from .skipping import Sublayer
from .stores import ProfileStore, SQLiteProfileStore, open_store

DEMO_ARTICLE = "Sky_(United_Kingdom)"
DEFAULT_PROFILE_CORPUS = "squad-v2-dev"


def ask(engine: AdaSkipEngine, document: str, question: str, budget: int, max_new_tokens: int) -> None:
    """Answer in full while measuring every sublayer, then again skipping the ``budget`` most redundant ones with
    the default policy's compensation, kept KV cache and protected tail."""
    messages = rag_messages(document, question)
    engine.generate("Hello", max_new_tokens=2)  # warm-up, so the timings below compare like with like
    probed = engine.generate(messages, max_new_tokens=1, probe=True)  # the measurements the plan comes from
    full = engine.generate(messages, max_new_tokens=max_new_tokens)  # timed without probes, like the skipping run
    n = full.stats.prompt_tokens
    profile = Profile.from_probes(engine.fingerprint, "demo", engine.num_layers, probed.prefill_probes or {}, n)
    plan = AdaSkipPolicy(budget=budget).prefill_plan(profile, n, engine.costs, budget)
    skip = engine.generate(messages, plan, max_new_tokens=max_new_tokens)
    print(f"Question: {question}")
    print(f"\nFull model ({full.stats.prompt_tokens} prompt tokens, prefill {full.stats.prefill_seconds:.2f}s):")
    print(f"  {full.text.strip()}")
    print(f"\nAdaSkip, {budget} most redundant of {2 * engine.num_layers} sublayers skipped:")
    print(f"  {skip.text.strip()}")
    print(f"\n  skipped attention: {skip.stats.skipped_attention} (KV cache kept, run in decode)")
    print(f"  skipped FFN:       {skip.stats.skipped_ffn_prefill}")
    if skip.stats.local_attention:
        print(
            f"  local attention:   {skip.stats.local_attention} (each prompt token saw the sink and the last "
            f"{skip.stats.local_window} tokens; full in decode)"
        )
    print(
        f"  the first {skip.stats.protected_head} and last {skip.stats.protected_tail} prompt tokens (the "
        "attention sink; the question) ran every sublayer"
    )
    print(
        f"  prefill {skip.stats.prefill_seconds:.2f}s: measured "
        f"{full.stats.prefill_seconds / skip.stats.prefill_seconds:.2f}x"
        f" vs estimated {skip.stats.estimated_prefill_speedup:.2f}x; KV cache saved: "
        f"{skip.stats.kv_bytes_saved / 2**20:.1f} MiB"
    )
    print("  (plan from this prompt's own measurements; learned per-collection profiles choose it in service)")


def build_default_profile(engine: AdaSkipEngine, questions: int, out: Path) -> Profile:
    """Run the full model over ``questions`` SQuAD v2 dev questions (about 1k-token documents) and write the
    resulting profile, the cold-start prior shipped in the package's ``profiles/``."""
    with tempfile.TemporaryDirectory() as tmp:
        engine = AdaSkipEngine(
            engine.model,
            engine.tokenizer,
            engine.name,
            store=SQLiteProfileStore(Path(tmp) / "p.sqlite"),
            policy=AdaSkipPolicy(warmup=10**9, refresh_every=0),  # always in full: every sublayer measured
        )
        for document, question in squad_questions(questions):
            engine.generate(rag_messages(document, question), collection=DEFAULT_PROFILE_CORPUS, max_new_tokens=16)
        own = engine.learner.store.get(engine.fingerprint, DEFAULT_PROFILE_CORPUS)
        model = engine.learner.store.global_profile(engine.fingerprint)  # the same requests, with the moments
    assert own is not None and model is not None  # the requests above were recorded
    profile = dataclasses.replace(model, collection=own.collection)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(profile.to_dict(), indent=1) + "\n")
    return profile


def _profile_table(profile: Profile, budget: int) -> str:
    """Per-layer mean similarity, scale (without the sink token), residual error of the affine compensation (where
    the profile keeps moments) and count; * marks the skipped sublayers."""
    similarity = profile.mean("similarity")
    scales = profile.mean("scale_no_sink")
    plan = top_k_plan(similarity, scales, budget)
    lines = [
        f"{profile.collection}  (model {profile.model}): {profile.queries} queries, mean context "
        f"{profile.mean_context:.0f} tokens (max {profile.max_context})",
        f"{'layer':>5} | {'attn sim':>8} {'scale':>6} {'error':>6} {'n':>5} | "
        f"{'ffn sim':>8} {'scale':>6} {'error':>6} {'n':>5}",
    ]
    for layer in range(profile.num_layers):
        cells = []
        for kind in KINDS:
            sub = Sublayer(kind, layer)  # type: ignore[arg-type]  # KINDS are the sublayer kinds
            skipped = layer in (plan.attn if kind == "attn" else plan.ffn)
            sim = f"{similarity[sub]:.4f}" if sub in similarity else "-"
            scale = f"{scales[sub]:.3f}" if sub in scales else "-"
            m = profile.sublayer_moments(sub)
            error = (
                f"{residual_error(m, fit(m, 'affine', scales[sub])):.4f}" if m is not None and sub in scales else "-"
            )
            cells.append(f"{sim:>7}{'*' if skipped else ' '} {scale:>6} {error:>6} {profile.counts[kind][layer]:>5}")
        lines.append(f"{layer:>5} | {cells[0]} | {cells[1]}")
    lines.append(
        f"* = skipped at budget {budget} (pooled top-{budget} by mean similarity); error = "
        "||y - f(x)||^2 / ||y||^2 of the affine compensation f"
    )
    state = profile.state
    if state.get("measured"):
        lines.append(f"last refresh: {state['measured']}")
    if state.get("guard"):
        lines.append(state["guard"]["reason"])
    return "\n".join(lines)


def plot_profile(profile: Profile, budget: int, out: Path) -> None:
    """Heatmap of mean IO similarity, layers x {attention, FFN}, skipped sublayers marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plotting needs matplotlib: pip install 'adaskip-rag[bench]'") from None
    similarity = profile.mean("similarity")
    plan = top_k_plan(similarity, profile.mean("scale"), budget)
    grid = [
        [similarity.get(Sublayer(k, layer), float("nan")) for k in ("attn", "ffn")]  # type: ignore[arg-type]
        for layer in range(profile.num_layers)
    ]
    fig, ax = plt.subplots(figsize=(3.6, 0.22 * profile.num_layers + 1.4))
    values = sorted(v for v in similarity.values())
    floor = values[len(values) // 10]  # a few outliers (layer 0, the last FFN) would flatten the colour scale
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=floor, vmax=values[-1])
    for layer in range(profile.num_layers):
        for col, skipped in enumerate((layer in plan.attn, layer in plan.ffn)):
            if skipped:
                ax.text(col, layer, "x", ha="center", va="center", color="red", fontsize=9, fontweight="bold")
    ax.set_xticks([0, 1], ["attention", "FFN"])
    ax.set_ylabel("layer")
    ax.set_title(f"{profile.collection}: {profile.queries} queries\nx = skipped at budget {budget}", fontsize=9)
    fig.colorbar(image, ax=ax, label="mean IO cosine similarity", extend="min")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _select(store: ProfileStore, where: str, collection: str, model: str | None) -> Profile:
    found = [p for p in store.profiles(model) if p.collection == collection]
    if not found:
        raise SystemExit(f"no profile for collection {collection!r} in {where}")
    if len(found) > 1:
        raise SystemExit(
            f"{collection!r} has profiles of several models; pick one with --model-id: "
            + ", ".join(p.model for p in found)
        )
    return found[0]


def profiles_command(args: argparse.Namespace) -> int:
    store = open_store(args.store)
    if args.action == "list":
        for p in store.profiles(args.model_id):
            print(f"{p.model}  {p.collection}  {p.queries} queries  mean context {p.mean_context:.0f}")
    elif args.action in ("show", "plot"):
        profile = _select(store, args.store, args.collection, args.model_id)
        budget = budget_count(args.budget, profile.num_layers)
        if args.action == "show":
            print(_profile_table(profile, budget))
        else:
            plot_profile(profile, budget, args.output)
            print(f"wrote {args.output}")
    elif args.action == "export":
        text = store.export_json(args.model_id)
        if args.output:
            args.output.write_text(text)
        else:
            print(text)
    elif args.action == "import":
        print(f"imported {store.import_json(args.file.read_text())} profiles")
    elif args.action == "reset":
        if not args.collection and not args.all:
            raise SystemExit("reset needs a collection, or --all")
        removed = 0
        for model in sorted({p.model for p in store.profiles(args.model_id)}):
            removed += store.delete(model, None if args.all else args.collection)
        print(f"removed {removed} profiles")
    elif args.action == "build-default":
        engine = AdaSkipEngine.from_pretrained(args.model)
        out = args.output or PROFILES / f"{engine.name}.json"  # a source checkout's top-level profiles/
        profile = build_default_profile(engine, args.questions, out)
        print(f"wrote {out}: {profile.queries} queries, mean context {profile.mean_context:.0f} tokens")
    return 0


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line naming the argument, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}\n")


def _count(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _budget(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a count or fraction >= 0, got {text}")
    return value


def serve_command(args: argparse.Namespace) -> int:
    """Load the engine, then serve it until interrupted."""
    import uvicorn  # the 'server' extra

    from .scheduler import ServingLimits
    from .server import create_app

    if args.ray:
        return ray_serve(args)
    limits = ServingLimits(max_batch_size=args.max_batch_size, max_tokens_in_flight=args.max_tokens_in_flight)
    store = open_store(args.profiles) if args.profiles else None
    library = None
    if args.chroma_path or args.chroma_host:
        import chromadb  # the 'chroma' extra

        client = (
            chromadb.HttpClient(host=args.chroma_host, port=args.chroma_port)
            if args.chroma_host
            else chromadb.PersistentClient(path=str(args.chroma_path))
        )
        library = Library(client)
        if args.demo and library.add_demo():
            print(f"added the collection {DEMO_COLLECTION!r}", file=sys.stderr)
    elif args.demo:
        raise ValueError("--demo needs --chroma-path or --chroma-host")
    engine = AdaSkipEngine.from_pretrained(args.model, store=store, serving=limits, compile_decode=args.compile_decode)
    if engine.compiled_decode:
        print(f"decode step compiled in {engine.compiled_decode.warmup_seconds:.0f} s", file=sys.stderr)
    app = create_app(engine, api_key=args.api_key, max_waiting=args.max_waiting, library=library)
    print(f"serving {engine.name} on http://{args.host}:{args.port} (the page at /)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def ray_serve(args: argparse.Namespace) -> int:
    """``--replicas`` replicas of the server on Ray Serve (the Ray instance of $RAY_ADDRESS, else a local one),
    ``--threads`` torch threads each (1 by default), until SIGINT or SIGTERM: then the application is deleted
    (answers under way finish) and the Ray instance left (a local one stops with it)."""
    if args.chroma_path or args.chroma_host or args.demo:
        raise ValueError(
            "--ray serves the OpenAI routes; the page's --chroma-path, --chroma-host and --demo are not served"
        )
    import ray  # the 'ray' extra
    from ray import serve

    from .server.ray_app import RayOptions, deployment

    options = RayOptions(
        model=str(args.model), profiles=args.profiles, threads=args.threads or 1, replicas=args.replicas,
        max_batch_size=args.max_batch_size, max_waiting=args.max_waiting, api_key=args.api_key,
        compile_decode=args.compile_decode,
    )  # fmt: skip
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        if stop.is_set():  # a second one: stop waiting for Serve
            raise KeyboardInterrupt
        stop.set()  # not an exception: raised inside Serve's deployment, Serve could swallow it and serve on

    ray.init()
    for s in (signal.SIGINT, signal.SIGTERM):  # after ray.init, whose SIGTERM handler would abort the process
        signal.signal(s, on_signal)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(deployment(options), name="adaskip", route_prefix="/")  # returns once the replicas are up
        print(f"serving {args.replicas} replicas on http://{args.host}:{args.port}", file=sys.stderr)
        stop.wait()
        serve.delete("adaskip")  # this application only (a cluster may run others); answers under way finish first
    finally:
        ray.shutdown()
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="adaskip-rag", description=__doc__)
    parser.add_argument("--model", default="default", help="'default' or a local model folder")
    parser.add_argument("--threads", type=_count(1), default=None, help="torch CPU threads")
    sub = parser.add_subparsers(dest="command", required=True)
    ask_p = sub.add_parser("ask", help="answer a question about a document, in full and with skipping")
    ask_p.add_argument("question")
    source = ask_p.add_mutually_exclusive_group(required=True)
    source.add_argument("--file", type=Path, help="a text file")
    source.add_argument("--squad", metavar="TITLE", help="a built-in SQuAD v2 dev article")
    for p in (ask_p, sub.add_parser("demo", help=f"ask about the built-in article {DEMO_ARTICLE}")):
        p.add_argument(
            "--budget",
            type=_count(0),
            default=AdaSkipPolicy.budget,
            help="sublayers to skip (default %(default)s, the policy's)",
        )
        p.add_argument("--max-new-tokens", type=_count(1), default=48)

    prof = sub.add_parser("profiles", help="inspect and manage the learned per-collection profiles")
    prof.add_argument(
        "--store",
        default=loading.profile_store_url(),
        help="a SQLite file or chroma://HOST:PORT (default: $ADASKIP_PROFILE_STORE, else the cache's file)",
    )
    prof.add_argument("--model-id", help="only profiles of this model fingerprint")
    actions = prof.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="every stored profile")
    for name in ("show", "plot"):
        a = actions.add_parser(name, help=f"{name} one collection's profile")
        a.add_argument("collection")
        a.add_argument(
            "--budget", type=_budget, default=AdaSkipPolicy.budget, help="mark the sublayers skipped at this budget"
        )
        if name == "plot":
            a.add_argument("-o", "--output", type=Path, default=Path("heatmap.png"))
    export = actions.add_parser("export", help="profiles as JSON")
    export.add_argument("-o", "--output", type=Path)
    actions.add_parser("import", help="add profiles from a JSON export").add_argument("file", type=Path)
    reset = actions.add_parser("reset", help="delete one collection's profile (or --all)")
    reset.add_argument("collection", nargs="?")
    reset.add_argument("--all", action="store_true")
    serve = sub.add_parser("serve", help="serve --model over OpenAI's HTTP API (needs the 'server' extra)")
    serve.add_argument("--model", default=argparse.SUPPRESS, help="'default' or a local model folder")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_count(0), default=8000)
    serve.add_argument("--profiles", help="profile store: a SQLite file or chroma://HOST:PORT (default as profiles)")
    serve.add_argument("--api-key", help="the key clients must send (Authorization: Bearer KEY); default: none")
    serve.add_argument("--max-batch-size", type=_count(1), default=8, help="requests answered together")
    serve.add_argument("--max-tokens-in-flight", type=_count(1), help="tokens the answered requests may hold")
    serve.add_argument("--max-waiting", type=_count(0), default=32, help="requests that may wait; more get 503")
    serve.add_argument(
        "--compile-decode", action="store_true", help="compile the decode step as the server starts (faster answers)"
    )
    chroma = serve.add_mutually_exclusive_group()
    chroma.add_argument("--chroma-path", type=Path, help="a Chroma folder the page at / asks questions of")
    chroma.add_argument("--chroma-host", help="a Chroma server the page at / asks questions of")
    serve.add_argument("--chroma-port", type=_count(1), default=8000)
    serve.add_argument("--demo", action="store_true", help=f"add the collection {DEMO_COLLECTION!r} if absent")
    serve.add_argument("--ray", action="store_true", help="replicas on Ray Serve (needs the 'ray' extra)")
    serve.add_argument("--replicas", type=_count(1), default=2, help="Ray Serve replicas (with --ray)")
    build = actions.add_parser(
        "build-default", help=f"build the shipped cold-start profile of --model over {DEFAULT_PROFILE_CORPUS}"
    )
    build.add_argument("--questions", type=_count(1), default=24)
    build.add_argument("-o", "--output", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.command == "profiles":
            if getattr(args, "budget", None) is not None and args.budget == int(args.budget):
                args.budget = int(args.budget)
            return profiles_command(args)
        if args.command == "serve":
            return serve_command(args)
        if args.command == "demo":
            document, questions = squad_article(DEMO_ARTICLE)
            question = questions[0]["question"]
        else:
            question = args.question
            document = args.file.read_text() if args.file else squad_article(args.squad)[0]
        ask(AdaSkipEngine.from_pretrained(args.model), document, question, args.budget, args.max_new_tokens)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
