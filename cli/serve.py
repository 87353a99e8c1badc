"""`llmctl serve RUN`: put a finished run's model behind an OpenAI-compatible API and a chat page (Ray Serve).

  --local        serve here, on a local Ray cluster, until Ctrl-C (trainer/serve/app.py `run_local`)
  (default)      create a KubeRay RayService on the cluster (cli/kube/rayservice.py); --dry-run -o yaml prints it
  --delete       delete the run's RayService (the checkpoints stay in storage)
  --engine vllm  on the cluster, serve the run's Hugging Face export (`llmctl export`) with Ray Serve LLM (vLLM)
                 on GPUs instead of llmctl's own engine (docs/serving.md, "Serving with vLLM")

The run is looked up like `llmctl chat` does (a name under --storage, or a URL), and its stored plan and
checkpoint are checked before anything is created: a missing run, stage or step, or a plan.json that is not a
run's (trainer/run_loader.py `read_checked_plan`: an object, a DNS-1035 name, known stages, the shape) is one
line, exit 2. The RayService is built from what was checked (`service_run`), never from the stored plan's own
URLs or stage entries.
Cluster mode reads the cluster config from the `llmctl-config` ConfigMap (or --cluster-config FILE).

Examples:
  llmctl serve gpt-d4-2xcpu-1a2b3c4d --local --port 8000
  llmctl serve gpt-d26-8xh100-1a2b3c4d --replicas 2 --gpus-per-replica 1 --dry-run -o yaml
  llmctl serve gpt-d26-8xh100-1a2b3c4d --engine vllm --dry-run -o yaml
  llmctl serve gpt-d26-8xh100-1a2b3c4d --delete --yes
"""

from __future__ import annotations

import os

import argparse
import sys

from cli.errors import UsageError
from cli.flags import add_cluster_args

STAGES = {"sft": "sft", "chat": "sft", "pretrain": "pretrain", "base": "pretrain"}
GROUP, VERSION, PLURAL = "ray.io", "v1", "rayservices"


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a run's model: OpenAI-compatible API + chat page (Ray Serve)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="run name (under --storage) or the run's URL")
    p.add_argument("--storage", help="storage root where run names are looked up (default: the cluster "
                   "config's storageRoot; --local: file://~/.cache/llmctl)")
    p.add_argument("--stage", default="sft", choices=sorted(STAGES), help="sft (default, chat) or pretrain (base)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest whole one)")
    p.add_argument("--engine", default="llmctl",
                   help="llmctl (default): our engine on the checkpoints; vllm: Ray Serve LLM on the run's "
                   "Hugging Face export (cluster, GPUs)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together per replica (default 16)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting per replica before 503 (default 64)")
    g = p.add_argument_group("local")
    g.add_argument("--local", action="store_true", help="serve on this machine (local Ray) until Ctrl-C")
    g.add_argument("--host", default="127.0.0.1", help="--local: address to listen on (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="--local: HTTP port (default 8000)")
    g = p.add_argument_group("cluster")
    g.add_argument("--replicas", type=int, default=1, help="Serve replicas, one pod each (default 1)")
    g.add_argument("--gpus-per-replica", type=int, default=1, help="GPUs per replica; 0 = CPU replicas (default 1)")
    g.add_argument("--gpu-type", default="h100", help="GPU type the replicas run on (default h100)")
    g.add_argument("--cpus-per-replica", type=int, help="CPUs per replica pod (default: the config's per GPU, or 4)")
    g.add_argument("--image", help="image (default: the cluster config's)")
    g.add_argument("--env", action="append", metavar="KEY=VALUE", help="extra environment on Ray containers")
    g.add_argument("--cluster-config", metavar="FILE", help="cluster config file used instead of the ConfigMap")
    g.add_argument("--dry-run", action="store_true", help="print the RayService; send nothing")
    g.add_argument("-o", "--output", choices=("yaml", "json"), help="print objects in this format")
    g.add_argument("--delete", action="store_true", help="delete the run's RayService")
    g.add_argument("-y", "--yes", action="store_true", help="do not ask (required off a terminal)")
    add_cluster_args(p)
    p.set_defaults(func=cmd_serve)


def _checked_run(url: str, args, opts: dict):
    """The stored plan, checked (name, shape, stages, tokenizer: a `run_loader.CheckedPlan`), after checking the
    stage's checkpoint exists (torch-free: trainer/run_loader.py's first two steps, which the replicas repeat
    before loading), or for --engine vllm the stage's Hugging Face export."""
    from trainer import run_loader

    try:
        checked = run_loader.read_checked_plan(url, opts)
        if args.engine == "vllm":
            run_loader.hf_export(url, checked, STAGES[args.stage], opts)
        else:
            run_loader.checkpoint_url(url, checked, STAGES[args.stage], args.step, opts)
    except run_loader.NoHFExport as e:
        from trainer.plan.urls import HF_EXPORT_STAGES

        raise UsageError(f"{e}; make it with: llmctl export {args.run} --stage {HF_EXPORT_STAGES[args.stage]} "
                         f"--format hf {e.url}") from None
    except run_loader.RunLoadError as e:
        if str(e).startswith("no run at"):
            raise UsageError(f"run {args.run!r} not found: no plan.json at {url}") from None
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"run {args.run!r}: cannot read {url}/plan.json ({e})") from None
    return checked


def service_run(checked, url: str) -> dict:
    """What cli/kube/rayservice.py reads of a run, from the checked plan and the URL it was opened at: the
    stored plan's `urls.run` (which could name another team's run) and its stage entries are not used."""
    return {"name": checked.name, "urls": {"run": url}, "stages": [{"name": s} for s in checked.stages],
            "spec": {"depth": checked.arch.n_layer, "seq_len": checked.arch.seq_len}}


def cmd_serve(args) -> int:
    if args.delete:
        return cmd_delete(args)
    for flag in ("replicas", "max_batch"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.max_queue < 0 or not 0 < args.port < 65536:
        raise UsageError("--max-queue must be >= 0 and --port in 1..65535")
    from cli.kube.rayservice import ENGINES

    if args.engine not in ENGINES:
        raise UsageError(f"--engine must be one of {', '.join(ENGINES)}, got {args.engine!r}")
    if args.engine == "vllm" and args.local:
        raise UsageError("--engine vllm serves on the cluster's GPUs only; --local serves with --engine llmctl")
    from trainer.storage import storage_options_from_env
    from trainer.storage import run_url

    if args.local:
        url = run_url(args.run, args.storage or "file://~/.cache/llmctl")
        opts = storage_options_from_env() if url.startswith("s3") else {}
        checked = _checked_run(url, args, opts)
        from cli.console import clean
        from trainer.serve.app import run_local

        print(f"serving {clean(checked.name)} ({STAGES[args.stage]}) on http://{args.host}:{args.port}/ - Ctrl-C stops",
              file=sys.stderr)
        return run_local({"run_url": url, "stage": STAGES[args.stage], "step": args.step,
                          "max_batch": args.max_batch, "max_queue": args.max_queue},
                         host=args.host, port=args.port)
    return cmd_cluster(args, run_url, storage_options_from_env)


def cmd_cluster(args, run_url, storage_options_from_env) -> int:
    from cli.console import confirm, dump_objects, require_yes, say
    from cli.kube.client import connect, read_config, resolve_namespace
    from cli.kube.config import ClusterConfig, load_config_file, parse_env
    from cli.kube.rayservice import build_rayservice

    extra_env = parse_env(args.env)
    if not args.dry_run:
        require_yes(args, "serve")
    file_cfg, warnings = load_config_file(args.cluster_config) if args.cluster_config else (None, [])
    kube = None
    if file_cfg is not None or args.dry_run:
        cfg, namespace = file_cfg or ClusterConfig(), resolve_namespace(args)
    else:
        kube = connect(args)
        cfg, warnings = read_config(kube)
        namespace = kube.namespace
    if args.image:
        cfg = cfg.replace(**{"serve_vllm_image" if args.engine == "vllm" else "image": args.image})
    url = run_url(args.run, args.storage or cfg.storage_root)
    opts = storage_options_from_env() if url.startswith("s3") else {}
    run = service_run(_checked_run(url, args, opts), url)
    from trainer.serve.access import API_KEY_ENV, key_digest

    key = os.environ.get(API_KEY_ENV)  # as for --local: only its SHA-256 reaches the cluster
    try:
        svc = build_rayservice(run, cfg, namespace=namespace, stage=STAGES[args.stage], step=args.step,
                               replicas=args.replicas, gpus_per_replica=args.gpus_per_replica,
                               gpu_type=args.gpu_type, cpus_per_replica=args.cpus_per_replica,
                               max_batch=args.max_batch, max_queue=args.max_queue, extra_env=extra_env,
                               api_key_sha256=key_digest(key) if key else None, engine=args.engine)
    except ValueError as e:
        raise UsageError(str(e)) from None
    name = svc["metadata"]["name"]
    what = (f"{args.replicas} replica(s) x " + (f"{args.gpus_per_replica} {args.gpu_type} GPU(s)"
                                                if args.gpus_per_replica else "CPU"))
    if args.dry_run:
        say(*(f"warning: {w}" for w in warnings),
             f"dry run: nothing was sent; the RayService for {name} ({what}) in namespace {namespace} follows")
        print(dump_objects([svc], args.output or "yaml"))
        return 0
    kube = kube or connect(args)
    if not args.yes and not confirm(f"Serve {name} in namespace {namespace} on {what}?"):
        say("not created")
        return 1
    created = kube.call(kube.custom.create_namespaced_custom_object, GROUP, VERSION, kube.namespace, PLURAL, svc,
                        what=f"create RayService {name}", verb="create", resource=PLURAL, name=name, group=GROUP)
    if args.output:
        print(dump_objects([created], args.output))
    else:
        print(f"rayservice.ray.io/{name} created in namespace {kube.namespace}")
    say(f"once ready, the API is the Service {name}-serve-svc port 8000 (OpenAI base URL http://{name}-serve-svc"
         f".{kube.namespace}:8000/v1; the chat page at /); next: llmctl status {name}   "
         f"llmctl serve {name} --delete")
    return 0


def cmd_delete(args) -> int:
    from cli.console import confirm, require_yes, say
    from cli.errors import CLIError
    from cli.kube.client import connect

    require_yes(args, "serve --delete")
    kube = connect(args)
    svc = kube.call(kube.custom.get_namespaced_custom_object, GROUP, VERSION, kube.namespace, PLURAL, args.run,
                    what=f"get RayService {args.run}", verb="get", resource=PLURAL, name=args.run, group=GROUP)
    if (svc.get("metadata", {}).get("labels") or {}).get("app.kubernetes.io/managed-by") != "llmctl":
        raise CLIError(f"RayService {args.run} was not created by llmctl; delete it with kubectl if you mean to")
    if not args.yes and not confirm(f"Delete the RayService {args.run} in namespace {kube.namespace}?"):
        say("not deleted")
        return 1
    kube.call(kube.custom.delete_namespaced_custom_object, GROUP, VERSION, kube.namespace, PLURAL, args.run,
              propagation_policy="Background", what=f"delete RayService {args.run}", verb="delete",
              resource=PLURAL, name=args.run, group=GROUP)
    print(f"rayservice.ray.io/{args.run} deleted in namespace {kube.namespace}")
    say("its Ray cluster and pods go with it; the run's checkpoints stay in storage")
    return 0
