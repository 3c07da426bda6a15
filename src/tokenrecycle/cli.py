"""Command line: `tokenrecycle generate "PROMPT"`, `tokenrecycle chat`, tune, index and bench."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from functools import partial
from pathlib import Path

from .devices import DEVICES
from .errors import InvalidOptionError, TokenRecycleError
from .models import BUNDLED, DEFAULT_MODEL, DTYPES
from .runners import RUNNERS
from .drafters.registry import DEFAULT_DRAFTER, DRAFTERS, TRAIN_FREE
from .prompts import check_prompt_text
from .trees.templates import TEMPLATES

EXIT_BAD_INPUT = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad option is one line on stderr and exit code 2, without the usage block."""

    def error(self, message: str) -> None:
        self.exit(EXIT_BAD_INPUT, f"tokenrecycle: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="tokenrecycle", description="Lossless speculative decoding with Token Recycling.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    gen = commands.add_parser("generate", help="generate an answer to a prompt, streamed")
    gen.add_argument("prompt", nargs="?", default=None, help="the prompt (instruct models get their chat template); - reads it from standard input")
    gen.add_argument("--prompt-file", default=None, help="read the prompt from this file (UTF-8) instead")
    add_model_options(gen)
    add_decoding_options(gen)
    add_sampling_options(gen)
    gen.add_argument("--no-chat", action="store_true", help="send the prompt as raw text, without the chat template")
    gen.add_argument("--compare", action="store_true", help="also run plain greedy decoding of the same model and compare")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    chat = commands.add_parser("chat", help="a multi-turn conversation in the terminal, each answer streamed (/reset starts over)")
    add_model_options(chat)
    add_decoding_options(chat)
    add_sampling_options(chat)
    tune = commands.add_parser("tune", help="measure this machine and choose the draft tree --tree auto uses")
    add_model_options(tune)
    tune.add_argument("--seconds", type=float, default=60.0, help="about how long to measure")
    tune.add_argument("--show", action="store_true", help="print the saved profile; measure nothing")
    index = commands.add_parser("index", help="build a retrieval datastore from a corpus, once")
    index.add_argument("corpus", nargs="+", help=".txt files (one document each) or .jsonl files (a document per line: its 'text', else its string values)")
    index.add_argument("--model", default=DEFAULT_MODEL, help="whose tokenizer to use")
    index.add_argument("--out", required=True, help="the datastore file to write (.npz)")
    add_bench_parser(commands)
    add_serve_parser(commands)
    return parser


def add_model_options(parser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"bundled name ({', '.join(BUNDLED)}), .gguf file or model directory")
    parser.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto", help="auto: bfloat16 where the device multiplies it fast, else float32")
    add_device_option(parser)
    parser.add_argument("--runner", choices=RUNNERS, default="auto", help="fast (own decoder loop) where the architecture allows, hf (transformers' forward) otherwise")
    parser.add_argument(
        "--quantize", choices=["int4", "gguf"], default=None,
        help="int4: 4-bit weights in groups of 32, bf16 LM head; gguf: the GGUF file's own quantised weights "
        "(Q4_0/Q4_1/Q4_K in 4 bits, Q8_0/Q5_0 in 8, other types requantised to 8). Each is a model of its own; "
        "needs bfloat16 and the fast runner",
    )  # fmt: skip
    parser.add_argument("--topk", type=int, default=8, help="candidates kept per token in the recycling table")


def add_device_option(parser) -> None:
    parser.add_argument("--device", default="auto", help=f"{'|'.join(DEVICES)}: where the model runs (auto: the GPU where torch sees one, else the CPU)")


def add_decoding_options(parser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--tree", default="auto", help=f"auto (default: the tree tuned for this machine, tuned on first use), adaptive (starts there and follows each request's acceptance), a named tree ({', '.join(TEMPLATES)}), dynN (dynamic, N nodes) or a JSON file of rank paths")
    parser.add_argument("--no-tune", action="store_true", help="with --tree auto and no profile yet: use the static default tree instead of tuning")
    parser.add_argument("--tune-seconds", type=float, default=60.0, help="time for tuning on first use")
    parser.add_argument("--drafter", choices=TRAIN_FREE + ("plain",), default=None, help="train-free drafting: " + "; ".join(f"{name}: {DRAFTERS[name].description}" for name in TRAIN_FREE) + f" (default {DEFAULT_DRAFTER}); plain: no drafts")
    parser.add_argument("--datastore", default=None, help="for retrieval, merged and auto: a datastore file from tokenrecycle index")
    parser.add_argument("--draft", default=None, help="draft with a draft model instead of Token Recycling: early-exit:N (this model's first N layers), int4 (a 4-bit copy) or a model with the same tokenizer")
    parser.add_argument("--draft-shape", default="chain", help="with --draft: chain (adaptive length, speculative sampling), W1,W2,... children per level (a tree drawn without replacement: RSD) or beam:W,D (a stochastic beam search of width W and depth D)")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable); may span tokens")
    parser.add_argument("--table", default=None, metavar="PATH|none", help="where the recycling table is kept between runs, so each run drafts from what the earlier ones learned (it changes drafts only): by default in the cache, ~/.cache/tokenrecycle/tables/ ($TOKENRECYCLE_CACHE/tables/), one file per model and topk, loaded at start and saved after each run (serve: also every minute when it changed, and at shutdown); none: start with an empty table and keep no file; or a file PATH instead")


def add_sampling_options(parser) -> None:
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; above 0: sample, with exactly the distribution plain sampling has")
    parser.add_argument("--top-k", type=int, default=50, help="sampling: keep the k most likely tokens (0: off; 50 as in transformers)")
    parser.add_argument("--top-p", type=float, default=1.0, help="sampling: nucleus, the smallest set with this much probability")
    parser.add_argument("--min-p", type=float, default=None, help="sampling: drop tokens below this fraction of the top token's probability")
    parser.add_argument("--seed", type=int, default=None, help="sampling: seed for a repeatable sample")


def add_bench_parser(commands) -> None:
    from .bench.methods import BASE_METHODS, DEFAULT_METHODS  # no torch: cheap

    bench = commands.add_parser("bench", help="benchmark tokenrecycle against plain decoding and peer methods")
    bench.add_argument("--questions", default=None, help="Spec-Bench-style JSON lines (question_id, category, turns); default: MT-Bench and HumanEval from installed packages")
    bench.add_argument("--per-category", type=int, default=None, help="the first N questions of each category")
    bench.add_argument("--max-new-tokens", type=int, default=128)
    bench.add_argument("--dtype", nargs="+", choices=["auto", *sorted(DTYPES)], default=["auto"], help="one report part per dtype")
    add_device_option(bench)
    bench.add_argument("--methods", type=comma_list, default=None, help=f"comma-separated, from {','.join(BASE_METHODS)}; default {','.join(DEFAULT_METHODS)} (those available)")
    bench.add_argument("--trees", type=comma_list, default=None, help="trees for the Token Recycling methods (comma-separated); default: the runner's default")
    bench.add_argument("--temperatures", type=float_list, default=(0.0,), help="comma-separated; 0 is greedy, others sample (top-k 50): e.g. 0,0.7,1.0")
    bench.add_argument("--draft", default=None, help="draft for sps and rsd: early-exit:N, int4 or a model with the same tokenizer (default: an early exit after a quarter of the layers)")
    bench.add_argument("--datastore", default=None, help="for retrieval: a datastore file made by tokenrecycle index")
    bench.add_argument("--repeats", type=int, default=1, help="runs per prompt and method; the median counts")
    bench.add_argument("--model", default=DEFAULT_MODEL)
    bench.add_argument("--draft-model", default=None, help="draft model for hf-assisted (must share the tokenizer)")
    # Defaults: the best of a sweep on Spec-Bench prompts here (docs/bench/pld_sweep.md).
    bench.add_argument("--pld-tokens", type=int, default=5, help="transformers prompt lookup: tokens proposed per step")
    bench.add_argument("--llamacpp-pld-tokens", type=int, default=3, help="llama.cpp prompt lookup: tokens proposed per step")
    bench.add_argument("--pld-ngram", type=int, default=2, help="prompt lookup: longest n-gram matched (both)")
    bench.add_argument("--warm-up", type=int, default=3, help="warm-up prompts per method (at most 3)")
    bench.add_argument("--no-cost-curve", action="store_true", help="skip measuring the runners' forward time against tree size")
    bench.add_argument("--out", default="bench-results", help="directory for results.json, report.md and plots")
    bench.add_argument("--resume", action="store_true", help="continue an interrupted run in --out (same settings and CPU), from its last whole question")
    bench.add_argument("--render", metavar="DIR", default=None, help="rebuild report.md and plots from DIR/results.json; run nothing")


def add_serve_parser(commands) -> None:
    from .engine import DEFAULT_MAX_WAITING, DEFAULT_PREFILL_CHUNK
    from .runners import DEFAULT_SLOTS
    from .server.settings import API_KEY_ENV, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_TOKENS

    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server: chat and text completions, streamed or not; /metrics")
    add_model_options(serve)
    add_decoding_options(serve)  # --max-new-tokens: the most a request gets when it gives no max_tokens
    serve.set_defaults(max_new_tokens=DEFAULT_MAX_TOKENS)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free one)")
    serve.add_argument("--max-slots", type=int, default=DEFAULT_SLOTS, help="requests decoded at once, each on its own KV-cache slot")
    serve.add_argument("--no-batching", action="store_true", help="one forward pass per request, one after another (default: the running requests' trees share one pass)")
    serve.add_argument("--max-batch-tokens", type=int, default=None, help="most tokens in one batched pass, trees and prompt chunks together (default: 256, or more to hold a chunk and every slot)")
    serve.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK, help="prompt tokens a joining request runs per batched pass")
    serve.add_argument("--queue", type=int, default=DEFAULT_MAX_WAITING, help="requests that may wait for a slot; one more is answered 429")
    serve.add_argument("--api-key", default=None, help=f"clients must send Authorization: Bearer KEY (default: ${API_KEY_ENV}; neither: no key needed)")
    serve.add_argument("--served-model-name", default=None, help="the model name clients send (default: the model's own, e.g. smollm2)")
    serve.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="larger request bodies are answered 413")
    serve.add_argument("--threads", type=int, default=None, help="torch threads (with --replicas: per replica; default: the cores divided by the replicas)")
    ray = serve.add_argument_group("replicas on Ray Serve (the optional extra tokenrecycle[ray])")
    ray.add_argument("--replicas", type=int, default=None, help="serve with N model replicas behind Ray Serve's HTTP proxy, on a local Ray instance (default: one process, no Ray)")
    ray.add_argument("--ray-address", default=None, help="join this Ray cluster (e.g. HEAD:6379 after ray start --head) instead of starting one here")
    ray.add_argument("--min-replicas", type=int, default=None, help="autoscaling: the fewest replicas")
    ray.add_argument("--max-replicas", type=int, default=None, help="autoscaling: the most replicas (the cores are shared by this many)")
    ray.add_argument("--target-ongoing-requests", type=float, default=None, help="autoscaling: the requests per replica Ray Serve aims at")


def float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(item) for item in comma_list(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None


def comma_list(text: str) -> tuple[str, ...]:
    items = tuple(item.strip() for item in text.split(",") if item.strip())
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_request:  # --help, or a bad option already reported in one line
        return int(exit_request.code or 0)
    try:
        commands = {"generate": run_generate, "chat": run_chat, "tune": run_tune, "bench": run_bench, "index": run_index, "serve": run_serve}
        return commands[args.command](args)
    except TokenRecycleError as exc:
        print(f"tokenrecycle: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("tokenrecycle: interrupted", file=sys.stderr)
        return 130


def run_generate(args: argparse.Namespace) -> int:
    prompt = check_prompt_text(prompt_of(args))
    request = request_settings(args)
    generator, tables = prepared_generator(args)
    prompt_ids = generator.encode(prompt, request.chat)  # once: the ids are what every run below decodes
    generator.check_fits(prompt_ids, request.max_new_tokens)
    if args.compare:
        warm_up(generator, request.chat)
    drafter = drafter_of(generator, args)
    generation = generator.stream(prompt_ids, request.max_new_tokens, request.stop, drafter=drafter, sampling=request.sampling)
    for piece in generation:
        if not args.json:
            print(piece, end="", flush=True)
    result = generation.result
    save_table(tables, generator.engine)
    setup = generator.engine.describe(drafting_label(args))
    table_file = tables.path(generator.engine)
    report = {
        **setup.to_dict(),
        "table_file": table_file and str(table_file),
        "draft": args.draft,
        "sampling": asdict(request.sampling) if request.sampling else None,
        "drafter_bytes": (drafter or generator.engine.recycling).memory_bytes,
        **result.to_dict(),
    }
    if not args.json:
        print(f"\n\n[tokenrecycle] {result.stats_line()} · {setup.summary()}", file=sys.stderr)
    if args.compare:
        plain, baseline = compare_baseline(generator, prompt_ids, request)
        comparison = {
            "baseline": baseline,
            "baseline_tokens_per_s": plain.tokens_per_s,
            "speedup": result.tokens_per_s / plain.tokens_per_s if plain.tokens_per_s else 0.0,
            "identical": plain.token_ids == result.token_ids,
        }
        report.update(comparison)
        if not args.json:
            print(
                f"[{baseline}] {plain.tokens_per_s:.1f} tokens/s · speedup {comparison['speedup']:.2f}x · "
                f"identical output: {identical_text(comparison['identical'], generator.dtype, request.sampling is not None)}",
                file=sys.stderr,
            )
    if args.json:
        print(json.dumps(report))
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from .chat import ChatSettings, chat_session

    request = request_settings(args)
    # Undecodable input becomes lone surrogates the session refuses line by line, not a traceback.
    if hasattr(standard_input(), "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")
    generator, tables = prepared_generator(args)
    settings = ChatSettings(request.max_new_tokens, request.stop, drafter_of(generator, args), request.sampling)
    try:
        return chat_session(generator, settings)
    finally:
        save_table(tables, generator.engine)


def prompt_of(args: argparse.Namespace) -> str:
    """The prompt from exactly one source: the argument, standard input (-) or --prompt-file."""
    given = [source for source in (args.prompt, args.prompt_file) if source is not None]
    if len(given) != 1:
        raise InvalidOptionError("give exactly one prompt: as an argument, - for standard input, or --prompt-file FILE")
    if args.prompt_file is not None:
        try:
            data = Path(args.prompt_file).read_bytes()
        except OSError as exc:
            raise InvalidOptionError(f"cannot read prompt file '{args.prompt_file}': {exc.strerror or exc}") from None
        return utf8_text(data, f"the prompt file '{args.prompt_file}'")
    if args.prompt == "-":
        return utf8_text(standard_input().buffer.read(), "the prompt on standard input")
    return require_utf8(args.prompt, "the prompt")


def standard_input():
    if sys.stdin is None:  # started with standard input closed
        raise InvalidOptionError("there is no standard input to read from")
    return sys.stdin


def utf8_text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8-sig")  # a leading byte-order mark is not part of the prompt
    except UnicodeDecodeError as exc:
        raise InvalidOptionError(f"{what} is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None


def require_utf8(text: str, what: str) -> str:
    """Arguments that were not valid UTF-8 reach Python as lone surrogates, which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidOptionError(f"{what} is not valid UTF-8") from None
    return text


def request_settings(args: argparse.Namespace):
    """The per-request options of generate and chat, checked by their owners before anything loads."""
    from .request import RequestSettings
    from .sampling import Sampling

    if args.draft and args.drafter is not None:
        raise InvalidOptionError("--draft (a draft model) and --drafter (train-free drafting) exclude each other")
    for stop in args.stop:
        require_utf8(stop, f"the stop string {stop!r}")
    sampling = Sampling.of(args.temperature, args.top_k, args.top_p, args.min_p, args.seed)
    return RequestSettings(args.max_new_tokens, args.stop, sampling, chat=False if getattr(args, "no_chat", False) else None)


def prepared_generator(args: argparse.Namespace):
    """The generator generate and chat decode with: loaded, tuned on first use, its table loaded;
    and the table's file, to save it to after the run."""
    from .tables import TableFile

    tables = TableFile(args.table)  # a bad --table fails here, before the model loads
    generator = load_generator(args, args.tree)
    tree = generator.engine.tree
    if tree.problem:
        print(f"tokenrecycle: {tree.problem}", file=sys.stderr)
    if args.tree == "auto" and tree.name != "auto" and not args.no_tune:
        print(f"tokenrecycle: {'tuning again' if tree.problem else 'no tuning profile for this setup yet: tuning once'} (--no-tune keeps the static tree)", file=sys.stderr)
        tune_with_progress(generator, args.tune_seconds)
    warn(tables.load(generator.engine))  # after tuning: choosing the tuned tree starts a new table
    return generator, tables


def warn(problem: str | None) -> None:
    if problem:
        print(f"tokenrecycle: warning: {problem}", file=sys.stderr)


def save_table(tables, engine) -> None:
    """The table's file after a run, and the server's saves (periodic and final): a problem is a
    warning, never a failed run."""
    warn(tables.save(engine))


def drafter_of(generator, args: argparse.Namespace):
    """None for the engine's default drafter (built per request on the shared table, which --table
    keeps), else a drafter from the registry whose Token Recycling part drafts from that same table."""
    name = "draft-model" if args.draft else args.drafter or DEFAULT_DRAFTER
    if name == DEFAULT_DRAFTER:
        return None
    from .suffix_automaton import SuffixAutomaton

    store = SuffixAutomaton.load(args.datastore) if args.datastore and DRAFTERS[name].uses_datastore else None
    return generator.build_drafter(name, datastore=store, draft=args.draft, draft_shape=args.draft_shape, own_table=False)


def drafting_label(args: argparse.Namespace) -> str:
    if args.draft:
        return f"draft {args.draft} ({args.draft_shape})"
    return args.drafter or DEFAULT_DRAFTER


def load_generator(args: argparse.Namespace, tree: str):
    from .devices import resolve_device
    from .generator import Generator  # imports torch and transformers: not needed for --help

    device = resolve_device(args.device)  # a GPU that is not there fails here, before any loading
    announce_native_build(args.runner, device)
    return Generator(args.model, dtype=args.dtype, device=device, runner=args.runner, tree=tree, topk=args.topk, quantize=args.quantize)


def announce_native_build(runner: str, device) -> None:
    """The fast runner's first load compiles its C++ loop inside torch's builder, silently: say
    so (on the CPU: a GPU runs no C++ loop)."""
    from .runners.native import native_module_built, native_wanted

    if runner != "hf" and device.type == "cpu" and native_wanted() and not native_module_built():
        print("tokenrecycle: building the C++ decoder loop (once, about 30 s)", file=sys.stderr)


def run_tune(args: argparse.Namespace) -> int:
    from .tuning import load_profile

    generator = load_generator(args, "none")
    key = generator.engine.profile_key
    profile = load_profile(key) if args.show else tune_with_progress(generator, args.seconds)
    if profile is None:
        raise InvalidOptionError("no tuning profile for this setup yet (run tokenrecycle tune)")
    costs = profile.mean_cost_ms
    setup = generator.engine.describe()
    print(f"{setup.dtype} · {setup.runner_text()} · {key.path}")
    print("forward ms by tree tokens: " + ", ".join(f"{n}: {ms:.1f}" for n, ms in costs.items()))
    print(f"chosen tree: {profile.summary()}")
    print(json.dumps([list(p) for p in profile.plan.paths]))
    return 0


def run_index(args: argparse.Namespace) -> int:
    import time

    from .datastore import build_datastore

    start = time.perf_counter()
    automaton, documents = build_datastore(args.corpus, args.model, args.out)
    seconds = time.perf_counter() - start
    size = Path(args.out).stat().st_size
    print(
        f"{args.out}: {documents} documents, {automaton.tokens} tokens, {len(automaton.length)} states, "
        f"{size / 2**20:.1f} MiB, built in {seconds:.1f} s"
    )
    return 0


def run_serve(args: argparse.Namespace) -> int:
    """Serve the engine over HTTP: the listening socket first, then the model loads in the
    background (/health answers 503 meanwhile); a load that fails ends the server, in one line."""
    import os

    from .devices import resolve_device
    from .server import API_KEY_ENV, ServerSettings, serve
    from .server.drafting import Drafting
    from .tables import TableFile

    if args.stop:
        raise InvalidOptionError("serve takes stop strings per request (the stop field), not --stop")
    resolve_device(args.device)  # before the socket opens: a missing GPU is one line, not a failed load
    if args.draft and args.drafter is not None:
        raise InvalidOptionError("--draft (a draft model) and --drafter (train-free drafting) exclude each other")
    settings = ServerSettings(
        served_model_name=args.served_model_name,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        default_max_tokens=args.max_new_tokens,
        max_body_bytes=args.max_body_bytes,
    )
    drafting = Drafting("draft-model" if args.draft else args.drafter or DEFAULT_DRAFTER, serving_datastore(args), args.draft, args.draft_shape)
    tables = TableFile(args.table)
    keep = partial(save_table, tables)  # every ServerSettings.save_every_s while serving, and at the stop
    replicas = replica_settings(args)
    if replicas is None:
        return serve(partial(serving_engine, args, tables), settings, drafting, args.host, args.port, on_stop=keep, on_interval=keep)
    from .server.cluster import serve_on_ray

    replica_args = argparse.Namespace(**{**vars(args), "no_tune": True, "threads": None})  # tuned here once; threads set by the replica
    # Ray pickles the spec whole: each replica loads and saves through one copy of `tables`; all keep the one file, the last save wins.
    return serve_on_ray(partial(serving_engine, replica_args, tables), settings, drafting, args.host, args.port, replicas,
                        args.max_slots, args.queue, prepare=partial(prepare_replicas, args), on_stop=keep, on_interval=keep)  # fmt: skip


def replica_settings(args: argparse.Namespace):
    """None for one process; the replicas on Ray when any of their options is given."""
    from .server.settings import ReplicaSettings

    options = {"min_replicas": args.min_replicas, "max_replicas": args.max_replicas, "target_ongoing_requests": args.target_ongoing_requests}
    if args.replicas is None and args.ray_address is None and all(value is None for value in options.values()):
        ReplicaSettings(threads=args.threads)  # --threads is checked by the settings that own it
        return None
    return ReplicaSettings(replicas=1 if args.replicas is None else args.replicas, threads=args.threads, address=args.ray_address, **options)


def prepare_replicas(args: argparse.Namespace, threads: int) -> None:
    """Once, here, before local replicas start: the model converted, and with --tree auto the
    tree tuned for a replica's threads (replicas only load; two tuning at once would measure
    each other)."""
    import torch

    from .models import gguf_to_safetensors, resolve

    torch.set_num_threads(threads)
    path = resolve(args.model)
    if path.is_file():
        gguf_to_safetensors(path)
    if args.tree == "auto" and not args.no_tune:
        serving_engine(argparse.Namespace(**{**vars(args), "threads": threads}))


def serving_datastore(args: argparse.Namespace):
    """The datastore retrieval drafts from, read before the server starts (a bad file: one line)."""
    if not args.datastore:
        return None
    from .suffix_automaton import SuffixAutomaton

    return SuffixAutomaton.load(args.datastore)


def serving_engine(args: argparse.Namespace, tables=None):
    """The server's engine, as generate prepares its generator: tuned on first use, its table
    loaded from `tables` (a TableFile; None: the table starts empty)."""
    from .devices import resolve_device
    from .generator import Generator

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    announce_native_build(args.runner, device)
    generator = Generator(args.model, dtype=args.dtype, device=device, runner=args.runner, tree=args.tree, topk=args.topk,
                          quantize=args.quantize, max_slots=args.max_slots, max_waiting=args.queue,
                          batching=not args.no_batching, max_batch_tokens=args.max_batch_tokens,
                          prefill_chunk=args.prefill_chunk)  # fmt: skip
    tree = generator.engine.tree
    if tree.problem:
        print(f"tokenrecycle: {tree.problem}", file=sys.stderr)
    if args.tree == "auto" and tree.name != "auto" and not args.no_tune:
        print("tokenrecycle: no tuning profile for this setup yet: tuning once (--no-tune keeps the static tree)", file=sys.stderr)
        tune_with_progress(generator, args.tune_seconds)
    if tables is not None:
        warn(tables.load(generator.engine))
    return generator.engine


def tune_with_progress(generator, seconds: float):
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    if seconds <= 0:
        raise InvalidOptionError(f"the tuning time must be positive, got {seconds}")
    columns = TextColumn("tuning: {task.description:<32}"), BarColumn(), TimeRemainingColumn()
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("starting", total=1.0)
        return generator.tune(seconds, lambda fraction, text: bar.update(task, completed=fraction, description=text))


def run_bench(args: argparse.Namespace) -> int:
    from .bench import BenchConfig, default_questions, per_category, read_questions, render, run_bench

    if args.render:
        print(render(args.render))
        return 0
    questions = read_questions(args.questions) if args.questions else default_questions()
    config = BenchConfig(
        questions=per_category(questions, args.per_category),
        out=Path(args.out),
        question_source=args.questions or "MT-Bench and HumanEval (installed packages)",
        model=args.model,
        dtypes=tuple(args.dtype),
        device=args.device,
        methods=args.methods,
        trees=args.trees,
        max_new_tokens=args.max_new_tokens,
        temperatures=args.temperatures,
        repeats=args.repeats,
        draft_model=args.draft_model,
        draft=args.draft,
        datastore=args.datastore,
        pld_tokens=args.pld_tokens,
        pld_ngram=args.pld_ngram,
        llamacpp_pld_tokens=args.llamacpp_pld_tokens,
        warm_up=args.warm_up,
        cost_curve=not args.no_cost_curve,
        resume=args.resume,
    )
    run = run_bench(config)
    if run.status == "interrupted":
        print(f"tokenrecycle: interrupted; {f'partial results in {config.out}' if run.measured else 'nothing measured yet'}", file=sys.stderr)
        return 130
    print(Path(config.out) / "report.md")
    return 0


def identical_text(identical: bool, dtype: str, sampled: bool = False) -> str:
    if identical:
        return "yes"
    if sampled:
        return "no (two independent samples of the same distribution)"
    if dtype != "float32":
        # Batched verification is not bit-identical to one-token decoding in 16-bit arithmetic.
        return f"no ({dtype} rounding flips near-ties; outputs are token-exact in float32)"
    return "NO"


def compare_baseline(generator, prompt_ids, request):
    """Plain decoding of the same model: transformers' model.generate, or, for quantised
    weights that only the fast runner has, one token per step on that runner."""
    mode = "greedy" if request.sampling is None else "sampling"
    quantize = generator.engine.quantize
    n, stop, sampling = request.max_new_tokens, request.stop, request.sampling
    if quantize:
        return generator.generate(prompt_ids, n, stop, drafter="plain", sampling=sampling), f"plain {mode}, same {quantize} runner"
    return generator.generate_with_transformers(prompt_ids, n, stop, sampling=sampling), f"plain {mode} model.generate"


def warm_up(generator, chat) -> None:
    """One short run of each method so neither pays first-call costs inside the timing."""
    from .request import RequestSettings

    hello = generator.encode("Hello", chat)
    generator.generate(hello, max_new_tokens=4)
    compare_baseline(generator, hello, RequestSettings(4))

if __name__ == "__main__":
    sys.exit(main())
