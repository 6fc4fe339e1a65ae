"""The `remp` command: serve, generate, reconfigure, make-tiny-model, bench, profile, simulate.

Flags follow `vllm serve`. Heavy imports (torch, transformers, uvicorn) happen inside the
subcommands so `remp --help` stays instant. A request the user got wrong (a layout the
model cannot take, a directory that is not a model) ends with one `error: ...` line and
exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import faulthandler
import logging
import os
import signal
import sys
import time


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        sys.exit(args.run(args))
    except KeyboardInterrupt:
        sys.exit(130)


def build_parser() -> argparse.ArgumentParser:
    from remp import __version__

    parser = argparse.ArgumentParser(prog="remp", description="LLM inference server whose parallel "
                                     "layout (DP x TP x PP, experts TP or EP) is runtime state.")
    parser.add_argument("--version", action="version", version=f"remp {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    _add_engine_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=os.environ.get("REMP_API_KEY"),
                       help="require `Authorization: Bearer KEY` on /v1 routes (default: $REMP_API_KEY)")
    serve.add_argument("--served-model-name", help="the model name the API reports and accepts "
                       "(default: MODEL as given)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"])
    serve.add_argument("--max-request-bytes", type=int, default=8 * 2**20,
                       help="largest request body accepted; a larger one gets 413 before it is read "
                            "(default: 8 MiB)")
    serve.add_argument("--engine-stall-timeout", type=float, default=120.0,
                       help="seconds without progress (no step booked, or a switch or a worker replacement "
                            "still running) after which /health answers 503 (default: %(default)s)")
    auto = serve.add_argument_group("automatic layout (see docs/policy.md)")
    auto.add_argument("--auto-reconfigure", action="store_true",
                      help="switch the layout by itself as the load changes, predicted from a profile")
    auto.add_argument("--profile", help="the `remp profile` JSON to predict from (default: MODEL/remp_profile.json)")
    auto.add_argument("--slo-ttft-ms", type=float, help="time-to-first-token objective: optimise goodput under it")
    auto.add_argument("--slo-tpot-ms", type=float, help="time-per-output-token objective")
    auto.add_argument("--policy-interval", type=float, default=5.0, help="seconds between decisions (default 5)")
    auto.add_argument("--policy-window", type=float, default=30.0,
                      help="seconds of load history a decision sees (default 30)")
    auto.add_argument("--policy-horizon", type=float, default=60.0,
                      help="seconds over which a switch must repay its cost (default 60)")
    auto.add_argument("--policy-dwell", type=float, default=30.0,
                      help="least seconds between two automatic switches (default 30)")
    serve.set_defaults(run=_serve)

    generate = commands.add_parser("generate", help="generate text offline and report the speed")
    _add_engine_arguments(generate)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0, help="default 0: greedy")
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0)
    generate.set_defaults(run=_generate)

    reconf = commands.add_parser("reconfigure", help="switch a running server's layout live")
    reconf.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    reconf.add_argument("--tensor-parallel-size", "--tp", type=int, required=True)
    reconf.add_argument("--pipeline-parallel-size", "--pp", type=int, required=True)
    reconf.add_argument("--data-parallel-size", "--dp", type=int, default=1)
    reconf.add_argument("--enable-expert-parallel", action="store_true",
                        help="target expert parallelism (mixture-of-experts models)")
    reconf.add_argument("--expert-placement-strategy", choices=("linear", "round_robin"), default="linear")
    reconf.add_argument("--api-key", default=os.environ.get("REMP_API_KEY"))
    reconf.add_argument("--json", action="store_true", help="print the server's full JSON reply")
    reconf.set_defaults(run=_reconfigure)

    tiny = commands.add_parser("make-tiny-model", help="write a tiny random-weight checkpoint for tests")
    tiny.add_argument("dir")
    tiny.add_argument("--variant", "--arch", default="gqa",
                      choices=("gqa", "mha", "qwen2", "qwen3", "mistral", "mixtral", "qwen3-moe", "qwen2-moe"),
                      help="gqa (Llama, 8 query / 2 KV heads, default), mha (Llama, 4 / 4), qwen2 (4 / 2, qkv bias), "
                           "qwen3 (4 / 2, q/k norms, head_dim 32), mistral (8 / 2), mixtral (8 / 2, 8 experts, "
                           "top-2), qwen3-moe (as qwen3, 8 experts, top-2, layer 1 dense) or qwen2-moe (qkv "
                           "bias, 8 experts, top-2, a gated shared expert, layer 2 dense)")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--fused-experts", action="store_true",
                      help="mixtral, qwen3-moe, qwen2-moe: write each layer's experts fused, as transformers 5 holds them in "
                           "memory (experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I]), instead of "
                           "one tensor per expert as save_pretrained writes them")
    tiny.add_argument("--hidden-size", type=int, help="replace the variant's hidden size (64); a multiple of its "
                      "attention heads")
    tiny.add_argument("--num-layers", type=int, help="replace the variant's 4 layers")
    tiny.add_argument("--intermediate-size", type=int, help="replace the variant's MLP width: each expert's for "
                      "mixtral (96), qwen3-moe and qwen2-moe (48; qwen3-moe's dense layer's too), else 128")
    tiny.add_argument("--num-experts", type=int, help="mixtral, qwen3-moe, qwen2-moe: replace the 8 experts (top-2 "
                      "stays)")
    tiny.set_defaults(run=_make_tiny_model)

    profile = commands.add_parser("profile", help="measure every layout's prefill and decode cost and every "
                                  "switch on this machine into a JSON profile")
    _add_engine_arguments(profile)
    profile.add_argument("--output", "-o", help="where to write the profile (default: MODEL/remp_profile.json)")
    profile.add_argument("--layouts", help="comma-separated layouts ([dpZ]tpXppY[ep]), the first is started "
                         "(default: every layout valid on --worker-pool-size)")
    profile.add_argument("--batch-sizes", type=_int_list, help="decode batch sizes (default 1,4,16,32; clipped to "
                         "--max-num-seqs and the KV cache)")
    profile.add_argument("--context-lens", type=_int_list, help="decode context lengths (default 64,256; clipped "
                         "to --max-model-len)")
    profile.add_argument("--prefill-tokens", type=_int_list, help="prompt tokens per prefill step (default "
                         "64,256,1024; clipped to --max-num-batched-tokens)")
    profile.set_defaults(run=_profile)

    # The benchmark's own parser is built only when it runs: its imports take seconds.
    bench = commands.add_parser("bench", help="benchmarks: `remp bench {serve,layouts,switch,adaptive,peer,chaos} "
                                "--help`")
    bench.add_argument("benchmark", choices=["serve", "layouts", "switch", "adaptive", "peer", "chaos"],
                       help="serve: load-test a running OpenAI-compatible server; layouts: throughput of "
                       "each fixed layout vs transformers; switch: every live layout switch vs a restart; "
                       "adaptive: fixed layouts vs --auto-reconfigure; peer: remp beside the vLLM CPU build; "
                       "chaos: a soak of live switches with workers killed and stopped at random instants")
    bench.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    bench.set_defaults(run=_bench)

    from remp.sim import cli as sim_cli  # argparse only: the simulator is imported when it runs

    simulate = commands.add_parser("simulate", help="replay a trace or rate schedule against profiled layouts, "
                                   "fixed or under the autoscaling policy, and report as `remp bench serve` does")
    sim_cli.add_arguments(simulate)
    simulate.set_defaults(run=sim_cli.run)
    return parser


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="Hugging Face model directory")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    parser.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    parser.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                        help="data-parallel groups of tp * pp workers, each with its own requests and KV cache "
                             "(data-parallel attention; a dense model is that many replicas)")
    parser.add_argument("--enable-expert-parallel", action="store_true",
                        help="mixture-of-experts models: spread whole experts over the dp * tp ranks of each "
                             "stage instead of cutting every expert (attention stays tensor-parallel)")
    parser.add_argument("--expert-placement-strategy", choices=("linear", "round_robin"), default="linear",
                        help="under expert parallelism, rank r holds a contiguous block of experts (linear) or "
                             "every (dp * tp)-th one from r (round_robin)")
    parser.add_argument("--worker-pool-size", type=int,
                        help="worker processes, standbys included (default: dp * tp * pp)")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--max-model-len", type=int,
                        help="context length (default: the model's, at most 4096)")
    parser.add_argument("--max-num-batched-tokens", type=int)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                        help="serving dtype; auto: bfloat16 on CPUs with native bfloat16 (AVX512-BF16 or AMX), "
                             "float32 on other CPUs; on GPUs the checkpoint's 16-bit dtype, else bfloat16")
    parser.add_argument("--pack-weights", action=argparse.BooleanOptionalAction, default=None,
                        help="pack linear weights for oneDNN (bfloat16 on CPU): faster matmuls, but each "
                             "worker holds its shard as its own copy, packed after each switch beside the "
                             "steps; default: on for bfloat16 on CPUs with native bfloat16")
    parser.add_argument("--kv-cache-space", type=float, default=1.0, help="KV cache GiB per worker")
    parser.add_argument("--num-kv-blocks", type=int, help="KV cache blocks (overrides --kv-cache-space)")
    parser.add_argument("--threads-per-worker", type=int, help="default: cores / active workers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker-hang-timeout", type=float, default=15.0,
                        help="seconds a worker may go without a heartbeat while the engine waits on it before "
                             "it is declared hung and replaced (default: %(default)s)")


def _engine_config(args: argparse.Namespace):
    from remp.config import EngineConfig

    return EngineConfig(
        model=args.model,
        tensor_parallel_size=args.tensor_parallel_size,
        enable_expert_parallel=args.enable_expert_parallel,
        data_parallel_size=args.data_parallel_size,
        expert_placement_strategy=args.expert_placement_strategy,
        pipeline_parallel_size=args.pipeline_parallel_size,
        worker_pool_size=args.worker_pool_size,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        dtype=args.dtype,
        pack_weights=args.pack_weights,
        kv_cache_space_gb=args.kv_cache_space,
        num_kv_blocks=args.num_kv_blocks,
        threads_per_worker=args.threads_per_worker,
        seed=args.seed,
        worker_hang_timeout_s=args.worker_hang_timeout,
    )


def _fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from remp.engine.async_engine import AsyncEngine
    from remp.server.api import build_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # SIGTERM behaves like Ctrl-C, so the engine's workers are shut down on `kill` as well;
    # uvicorn re-raises the signal after its graceful shutdown.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints every thread's stack
    config = _engine_config(args)
    config.served_model_name = args.served_model_name
    try:
        policy = _auto_policy(args, config) if args.auto_reconfigure else None
        engine = AsyncEngine.start(config, load_window_s=args.policy_window)
    except (ValueError, OSError) as exc:  # TopologyError and ModelError included
        return _fail(exc)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            app = build_app(engine, args.api_key, policy, args.policy_interval, args.max_request_bytes,
                            args.engine_stall_timeout)
            # A client that never reads its reply cannot hold the shutdown (and the exit) up.
            uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=30)
    finally:
        engine.shutdown()
    if engine.error is not None:  # the pool could not be rebuilt: the server shut itself down
        print(f"error: the engine stopped: {engine.error}", file=sys.stderr)
        return 1
    return 0


def _auto_policy(args: argparse.Namespace, config):
    """The policy `--auto-reconfigure` runs: the profile's layouts that are valid for this model and
    pool, with the SLOs and hysteresis given."""
    from pathlib import Path

    from remp.config import ModelConfig
    from remp.policy.policy import Policy
    from remp.policy.profile import Profile
    from remp.topology import valid_layouts

    path = Path(args.profile or Path(args.model) / "remp_profile.json")
    if not path.is_file():
        raise ValueError(f"--auto-reconfigure needs a profile and {path} does not exist: run "
                         f"`remp profile {args.model} --worker-pool-size {config.pool_size}` first, or pass --profile")
    profile = Profile.load(path)
    if profile.pool_size != config.pool_size:
        raise ValueError(f"{path} was measured on a pool of {profile.pool_size} workers, this server has "
                         f"{config.pool_size}: profile again with --worker-pool-size {config.pool_size}")
    valid = [str(t) for t in valid_layouts(ModelConfig.from_pretrained(args.model), config.pool_size)]
    ms = 1e-3
    return Policy(profile, slo_ttft_s=args.slo_ttft_ms and args.slo_ttft_ms * ms,
                  slo_tpot_s=args.slo_tpot_ms and args.slo_tpot_ms * ms, horizon_s=args.policy_horizon,
                  dwell_s=args.policy_dwell, valid_layouts=valid)


def _generate(args: argparse.Namespace) -> int:
    from remp.engine.llm import LLM
    from remp.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    try:
        llm = LLM(_engine_config(args))
    except ValueError as exc:
        return _fail(exc)
    try:
        prompt = args.prompt
        if args.chat:
            prompt = list(llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                            add_generation_prompt=True, tokenize=True,
                                                            return_dict=False))
        start = time.perf_counter()
        [out] = llm.generate([prompt], params)
        elapsed = time.perf_counter() - start
    except ValueError as exc:
        return _fail(exc)
    finally:
        llm.shutdown()
    print(out.text)
    n = len(out.token_ids)
    print(f"{n} tokens in {elapsed:.2f} s: {n / elapsed:.1f} tokens/s ({out.finish_reason})", file=sys.stderr)
    return 0


def _bench(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(f"remp.bench.{args.benchmark}")
    parser = argparse.ArgumentParser(prog=f"remp bench {args.benchmark}", description=module.__doc__)
    module.add_arguments(parser)
    outcome = module.run(parser.parse_args(args.args))
    # A benchmark returns its exit status (chaos: 1 when a request was lost) or its result: success.
    return outcome if isinstance(outcome, int) else 0


def _reconfigure(args: argparse.Namespace) -> int:
    """POST /v1/admin/reconfigure; exit 0 when committed (or already there), 1 when rolled back,
    2 when the server refused the target."""
    import json

    import httpx

    from remp.topology import Topology

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    body = Topology(args.tensor_parallel_size, args.pipeline_parallel_size, args.enable_expert_parallel,
                    args.data_parallel_size, args.expert_placement_strategy).as_dict()
    try:
        reply = httpx.post(f"{args.url.rstrip('/')}/v1/admin/reconfigure", json=body, headers=headers, timeout=600)
    except httpx.HTTPError as exc:
        return _fail(exc)
    data = reply.json()
    if reply.status_code != 200:
        return _fail(RuntimeError(f"HTTP {reply.status_code}: {data.get('error', {}).get('message', data)}"))
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        src, dst = data["source"], data["target"]
        t = data["timings_s"]
        from remp.topology import Topology

        print(f"{data['outcome']}: {Topology.from_dict(src)} -> {Topology.from_dict(dst)}"
              + (f" ({data['reason']})" if data.get("reason") else ""))
        if t:
            def ms(times: dict[str, float]) -> str:
                return ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in times.items())

            print(f"  {ms(t)}")
            if data.get("build_s"):
                print(f"  of prepare, the slowest worker's build: {ms(data['build_s'])}")
            print(f"  KV moved {data['kv_bytes_moved'] / 2**20:.2f} MiB, {data['kv_bytes_in_pause'] / 2**20:.2f} MiB "
                  f"of it in the pause ({data['live_kv_blocks']} live blocks, {data['precopied_kv_blocks']} "
                  f"pre-copied), weights copied {data['weight_bytes_loaded'] / 2**20:.1f} MiB, "
                  f"preempted {len(data['preempted_request_ids'])} request(s)")
    return 1 if data["outcome"] == "rolled_back" else 0


def _int_list(text: str) -> list[int]:
    """argparse type of a comma-separated list of integers, e.g. --batch-sizes 1,4,16."""
    return [int(x) for x in text.split(",")]


def _profile(args: argparse.Namespace) -> int:
    from pathlib import Path

    from remp.policy.profiler import profile_model, summary
    from remp.topology import Topology

    output = args.output or str(Path(args.model) / "remp_profile.json")
    grid = {k: getattr(args, k) for k in ("batch_sizes", "context_lens", "prefill_tokens") if getattr(args, k)}
    start = time.perf_counter()
    try:
        layouts = [Topology.parse(name) for name in args.layouts.split(",")] if args.layouts else None
        profile = profile_model(_engine_config(args), layouts, **grid)
    except ValueError as exc:
        return _fail(exc)
    profile.save(output)
    print(summary(profile))
    print(f"wrote {output} ({len(profile.layouts)} layouts, {len(profile.switch)} switches) in "
          f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


def _make_tiny_model(args: argparse.Namespace) -> int:
    from remp.testing.tiny_model import make_tiny_model

    try:
        out = make_tiny_model(args.dir, variant=args.variant, seed=args.seed, fused_experts=args.fused_experts,
                              hidden_size=args.hidden_size, num_layers=args.num_layers,
                              intermediate_size=args.intermediate_size, num_experts=args.num_experts)
    except ValueError as exc:
        return _fail(exc)
    print(out)
    return 0


if __name__ == "__main__":
    main()
