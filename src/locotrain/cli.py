"""`loco`: run, compare, sample, list, corpus build.

Errors a user can cause, file-system failures included, print one line and exit with code 2.
Heavy modules (torch, matplotlib) are imported inside the commands that need them, so that
`loco --help` and `loco list` answer at once."""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import time
from pathlib import Path

from .errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
# workloads.py imports torch; `loco list` shows these instead (test_first_hour.py keeps them
# equal to each workload's `summary`)
WORKLOAD_SUMMARIES = {
    "ar_gpt": "character-level GPT, causal; exact bits per character",
    "masked_diffusion": "masked text diffusion on the same backbone; NELBO bound in bits per character",
}


def _default_out(name: str, what: str) -> Path:
    return Path("runs") / f"{name}-{what}-{time.strftime('%Y%m%d-%H%M%S')}"


def cmd_run(args) -> None:
    from .config import load_config
    from .run import train

    name, cfg = load_config(args.config, args.set)
    out = Path(args.out) if args.out else _default_out(name, cfg.algorithm.name)
    s = train(cfg, out, force=args.force, quiet=args.quiet)
    _note_rounding(cfg)
    bound = "<= " if "final_val_bpc_stderr" in s else ""
    print(f"{cfg.algorithm.name} on {s['workers']} worker(s), {s['params']:,} params, "
          f"{s['tokens']:,} tokens: final val {bound}{s['final_val_bpc']:.4f} bpc "
          f"(best {s['best_val_bpc']:.4f}), {s['time_s']:.1f} s wall, "
          f"{s['sim_time_s']:.1f} s simulated -> {out}")


def _note_rounding(cfg) -> None:
    """Every algorithm spends train.tokens in whole inner steps of all workers, rounding up:
    say so once, after training (before, it would make an error two lines)."""
    from .cluster import Cluster

    workers = Cluster(cfg.cluster, cfg.train.batch_size).workers
    per_step = cfg.model.seq_len * sum(w.batch_size for w in workers)
    tokens = cfg.train.tokens
    if tokens > per_step and tokens % per_step:  # (below one step, setup.build says so)
        rounded = -(-tokens // per_step) * per_step
        print(f"loco: note: train.tokens = {tokens:,} was rounded up to {rounded:,}, a whole "
              f"number of inner steps of all workers ({per_step:,} tokens each)", file=sys.stderr)


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """'eager+mode=naive+H=100' -> ('eager', ['algorithm.name=eager', 'algorithm.mode=naive',
    'algorithm.H=100']): an algorithm with some of its keys changed."""
    name, *changes = spec.strip().split("+")
    for change in changes:
        if "=" not in change:
            raise UserError(f"algorithm variant '{spec}': expected name+key=value+..., e.g. "
                            "diloco+H=100")
    return name, [f"algorithm.name={name}"] + [f"algorithm.{c}" for c in changes]


def cmd_compare(args) -> None:
    from . import report
    from .config import load_config
    from .metrics import atomic_write
    from .run import build, prepare_out_dir, train

    name, cfg = load_config(args.config, args.set)
    variants = args.algorithms.split(",") if args.algorithms else cfg.compare.algorithms
    if len(set(variants)) != len(variants):
        raise UserError(f"--algorithms lists a variant twice: {', '.join(variants)}")
    configs = {}
    for spec in variants:  # check every configuration before training any
        _, changes = parse_variant(spec)
        try:
            _, c = load_config(args.config, list(args.set) + changes)
            build(c)
        except UserError as e:  # which variant, when several are compared
            raise UserError(f"variant '{spec}': {e}") from None
        configs[spec] = c
    out = Path(args.out) if args.out else _default_out(name, "compare")
    if (out / "comparison.md").exists() and not args.force:
        raise UserError(f"'{out}' already holds a comparison; pass --force or another --out")
    prepare_out_dir(out, args.force)
    summaries, evals = {}, {}
    for spec, c in configs.items():
        folder = out / spec.replace("+", "_").replace("=", "-")
        summaries[spec] = train(c, folder, force=args.force, quiet=args.quiet, label=spec)
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        evals[spec] = [e for e in map(json.loads, lines) if e["event"] == "eval"]
    baseline = summaries[variants[0]]["best_val_bpc"]
    target = cfg.compare.target_bpc or baseline + cfg.compare.target_margin_bpc
    note = ("compare.target_bpc" if cfg.compare.target_bpc else
            f"{variants[0]}'s best + {cfg.compare.target_margin_bpc} (compare.target_margin_bpc)")
    table = report.comparison_markdown(summaries, evals, target, note)
    report.plot_curves(out / "loss_vs_tokens.png", evals, "tokens", "training tokens", name)
    report.plot_curves(out / "loss_vs_time.png", evals, "sim_time_s", "simulated time (s)", name)
    report.plot_curves(out / "loss_vs_bytes.png", evals, "bytes_sent", "bytes sent", name, logx=True)
    atomic_write(out / "comparison.md", f"# {name}: {', '.join(variants)}\n\n{table}")
    atomic_write(out / "summary.json", json.dumps(summaries, indent=2))
    _note_rounding(cfg)
    print(table)
    print(f"-> {out}")


def cmd_resume(args) -> None:
    from .config import load_config
    from .run import resume, set_threads
    from .runtime.dist_checkpoint import real_checkpoint

    out = Path(args.dir)
    if real_checkpoint(out):
        return _resume_real(out, args)
    if (out / "config.toml").is_file():
        set_threads(load_config(str(out / "config.toml"))[1])
    s = resume(out, args.set, quiet=args.quiet).summary
    bound = "<= " if "final_val_bpc_stderr" in s else ""
    print(f"{s['algorithm']} on {s['workers']} worker(s), resumed: final val {bound}"
          f"{s['final_val_bpc']:.4f} bpc (best {s['best_val_bpc']:.4f}), "
          f"{s['sim_time_s']:.1f} s simulated -> {out}")


def _resume_real(out: Path, args) -> None:
    """A run of `loco launch` that wrote checkpoints: launch its ranks again, resuming."""
    from .config import load_config
    from .runtime.launch import launch
    from .setup import build

    if args.set:
        raise UserError("a real run resumes with the settings it was launched with; drop --set")
    cfg = load_config(str(out / "config.toml"))[1]
    setup = build(cfg)
    code = launch(cfg, out, setup.algorithm.processes(), setup.job.M,
                  setup.algorithm.synchronous, None, False, resume=True,
                  progress=not args.quiet)
    if code != 0:
        raise SystemExit(code)
    (out / "status.json").unlink(missing_ok=True)
    s = json.loads((out / "summary.json").read_text())
    print(f"{s['algorithm']} on {s['workers']} worker process(es), resumed: final val "
          f"{s['final_val_bpc']:.4f} bpc, {s['tokens']:,} tokens -> {out}")


def cmd_sweep(args) -> None:
    from .sweep import sweep

    name = Path(args.config).stem
    if not args.grid and args.seeds < 2:
        raise UserError("loco sweep needs a --grid KEY=V1,V2,... or --seeds N with N >= 2")
    out = Path(args.out) if args.out else _default_out(name, "sweep")
    table = sweep(args.config, args.grid, args.seeds, args.set, out, args.force, args.quiet,
                  args.shard)
    if table:
        print(table)
        print(f"-> {out}")


def cmd_sample(args) -> None:
    import torch

    from .checkpoint import load_checkpoint
    from .config import validate
    from .data import CharTokenizer, Corpus
    from .setup import pick_device
    from .workloads import build_workload

    params, cfg, vocab, meta = load_checkpoint(Path(args.dir))
    for key in ("prompt", "chars", "temperature", "seed", "method", "threshold", "steps"):
        value = getattr(args, key)
        if value is not None:
            setattr(cfg.sample, key, value)
    try:  # the checks `--set sample.KEY=...` gets; the checkpoint's config passed them already
        validate(cfg)
    except UserError as e:  # so the error is about a flag: name it as typed
        raise UserError(str(e).replace("sample.", "--")) from None
    tokenizer = CharTokenizer(vocab)
    empty = torch.zeros(0, dtype=torch.long)
    corpus = Corpus(meta.get("corpus", "checkpoint"), tokenizer, empty, empty)
    wl = build_workload(cfg, corpus, pick_device(cfg.train.device))
    expected = wl.spec.param_shapes()
    if {k: tuple(v.shape) for k, v in params.items()} != expected:
        raise UserError(f"checkpoint in '{args.dir}' does not match its own config "
                        "(tensor names or shapes differ); the files are corrupt or mixed up")
    params = {k: v.to(wl.device) for k, v in params.items()}
    result = wl.sample(params, cfg.sample.prompt, cfg.sample.chars,
                       torch.Generator().manual_seed(cfg.sample.seed))
    print(result.text)
    print(f"\n[{result.chars} characters, {result.steps} model evaluations, "
          f"{result.steps_per_char:.3f} per character]", file=sys.stderr)


def cmd_launch(args) -> None:
    from .config import load_config
    from .runtime.launch import launch

    from .setup import build

    name, cfg = load_config(args.config, args.set)
    out = Path(args.out) if args.out else _default_out(name, f"{cfg.algorithm.name}-real")
    setup = build(cfg)
    code = launch(cfg, out, setup.algorithm.processes(), setup.job.M,
                  setup.algorithm.synchronous, args.nproc, args.force, progress=not args.quiet)
    if code != 0:
        raise SystemExit(code)
    s = json.loads((out / "summary.json").read_text())
    dead = f"; died: {', '.join(s['dead_processes'])}" if s.get("dead_processes") else ""
    print(f"{cfg.algorithm.name} on {s['workers']} worker process(es): final val "
          f"{s['final_val_bpc']:.4f} bpc, {s['tokens']:,} tokens, {s['time_s']:.1f} s wall, "
          f"{s['bytes_sent']:,} bytes sent{dead} -> {out}")


def cmd_corpus(args) -> None:
    from .data.build import RECIPES, build

    built = build(args.name, Path(args.out), Path(args.source) if args.source else None)
    recipe = RECIPES[args.name]
    print(f"{args.name}: {built.chars:,} characters, {built.vocab} distinct, from "
          f"{built.pages} pages of {built.source} ({built.dropped} rare characters dropped), "
          f"{built.seconds:.1f} s -> {built.path}")
    print(f"sha256 {built.sha256}")
    print(f"licence: {recipe.licence}")
    if recipe.sha256 and built.sha256 == recipe.sha256:
        print("identical to the reference build")
    elif recipe.sha256:  # still usable; runs record the hash they trained on
        print(f"note: differs from the reference build of {recipe.package} {recipe.version} "
              f"(sha256 {recipe.sha256[:16]}..., {recipe.chars:,} characters): another package "
              "version or Python version", file=sys.stderr)


def cmd_list(args) -> None:
    from .algorithms import SUMMARIES
    from .config import describe_keys, preset_names, read_source

    if args.keys:
        print("\n".join(describe_keys()))
        return
    print("presets:")
    for name in preset_names():
        print(f"  {name:<18} {read_source(name)[1].get('description', '')}")
    print("workloads:")
    for name, text in WORKLOAD_SUMMARIES.items():
        print(f"  {name:<18} {text}")
    print("algorithms:")
    for name, text in SUMMARIES.items():
        print(f"  {name:<18} {text}")


class _OneLineParser(argparse.ArgumentParser):
    """Command-line mistakes in one line, like every other bad input (argparse would print
    its whole usage first); its subcommands' parsers are of this class too."""

    def error(self, message):
        hint = ""
        if "unrecognized arguments" in message and "=" in message and "--set" not in message:
            hint = "; a setting goes after --set, e.g. --set train.tokens=1000000"
        self.exit(2, f"{self.prog}: error: {message}{hint} (see `{self.prog} --help`)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _OneLineParser(prog="loco", description="Train language models across "
                            "unequal hardware joined by slow networks (simulated).")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("config", nargs="?", default="quickstart",
                       help="a preset name (see `loco list`) or a TOML file; default quickstart")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set model.depth=4 (repeatable)")
        p.add_argument("--out", help="output folder (default runs/<preset>-...-<time>)")
        p.add_argument("--force", action="store_true", help="replace a run already in --out")
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("run", help="train one algorithm")
    common(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("compare", help="train several algorithms on the same cluster and data")
    common(p)
    p.add_argument("--algorithms", help="comma-separated variants, e.g. "
                   "ddp,diloco,diloco+H=100,eager+mode=naive (default: compare.algorithms)")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("sweep", help="many simulations in one process, batched together")
    common(p)
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="values of one key (repeatable: the cartesian product runs)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per point (train.seed, +1, ...)")
    p.add_argument("--shard", default="", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_sweep)
    p = sub.add_parser("resume", help="continue an interrupted run from its checkpoint")
    p.add_argument("dir", help="the run folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change an eval.* or sample.* key (nothing that changes the training)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_resume)
    p = sub.add_parser("launch", help="run on real processes on this machine (torch.distributed)")
    common(p)
    p.add_argument("--nproc", type=int, help="number of processes (checked against the config)")
    p.set_defaults(func=cmd_launch)
    p = sub.add_parser("sample", help="print text from a finished run")
    p.add_argument("dir", help="the run folder")
    p.add_argument("--prompt")
    p.add_argument("--chars", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--method", choices=["confidence", "remask"], help="diffusion decoding")
    p.add_argument("--threshold", type=float, help="diffusion confidence threshold")
    p.add_argument("--steps", type=int, help="diffusion remask steps per block")
    p.set_defaults(func=cmd_sample)
    p = sub.add_parser("corpus", help="build a larger text corpus from a Debian package")
    corpus = p.add_subparsers(dest="action", required=True)
    p = corpus.add_parser("build", help="write the corpus NAME as one UTF-8 text file "
                          "(pydocs: Python's docs, ~9M characters; linuxdocs: the Linux "
                          "kernel's docs, ~29M)")
    p.add_argument("name", metavar="NAME", help="pydocs or linuxdocs")
    p.add_argument("--out", required=True, help="the text file to write (then data.path=FILE)")
    p.add_argument("--from", dest="source", metavar="PATH",
                   help="a downloaded .deb, or a folder of its HTML pages, instead of apt-get")
    p.set_defaults(func=cmd_corpus)
    p = sub.add_parser("list", help="presets, workloads and algorithms")
    p.add_argument("--keys", action="store_true", help="every config key")
    p.set_defaults(func=cmd_list)
    from .pipeline.cli import add_parser as add_place_parser
    from .planner.cli import add_parser as add_plan_parser

    add_plan_parser(sub)
    add_place_parser(sub)

    args = parser.parse_args(argv)
    outputs = _outputs()
    if outputs:  # forget folders of an earlier main() in this process
        outputs.prepared.clear()
    training = args.command in ("run", "compare", "sweep", "resume")
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if training else None
    try:
        args.func(args)
    except UserError as e:
        print(f"loco: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as e:  # disk full, read-only, no permission, a file where a folder goes
        if isinstance(e, (ConnectionError, TimeoutError)):
            raise  # the network's, not the file system's
        print(f"loco: error: {_describe_os_error(e, args)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM (run.py may have saved a checkpoint first)
        print(f"loco: interrupted{_mark_interrupted()}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _raise_interrupt(signum, frame):
    """SIGTERM (`kill`, a scheduler's time limit) stops a run the way Ctrl-C does."""
    raise KeyboardInterrupt


def _outputs():
    """outputs.py if this process imported it, else None: importing it loads torch, and a
    process that never imported it prepared no run folder."""
    return sys.modules.get(f"{__package__}.outputs")


def _mark_interrupted() -> str:
    """Mark every run folder this process started and did not finish; say where they are."""
    outputs = _outputs()
    folders = outputs.unfinished() if outputs else []
    if not folders:
        return ""
    stop = (signal.SIGINT, signal.SIGTERM)
    handlers = [signal.signal(s, signal.SIG_IGN) for s in stop]  # a second ^C: finish marking
    try:
        for folder in folders:
            outputs.mark_interrupted(folder)
    except OSError:
        pass  # the message below still says the run is incomplete
    finally:
        for s, h in zip(stop, handlers):
            signal.signal(s, h)
    where = os.path.commonpath([str(f) for f in folders])
    resumable = [f for f in folders if (f / "checkpoint" / "state.json").is_file()]
    if len(folders) == 1 and resumable:
        return f"; {where} holds an incomplete run: continue it with `loco resume {where}`"
    return f"; {where} holds an incomplete run"


# what to do about a file-system failure; the OS's own words say what went wrong
_OS_FIXES = {
    errno.ENOSPC: "free some space or choose another --out",
    errno.EDQUOT: "free some space or choose another --out",
    errno.EROFS: "choose another --out, on a disk you can write to",
    errno.EACCES: "fix its permissions or choose another path",
    errno.EPERM: "fix its permissions or choose another path",
}


def _describe_os_error(e: OSError, args) -> str:
    """'<path>': <problem>; <fix>. A write to an open file has no path: name the run folder."""
    outputs = _outputs()
    folder = outputs.prepared[-1] if outputs and outputs.prepared else getattr(args, "out", None)
    path = e.filename2 or e.filename or folder
    fix = _OS_FIXES.get(e.errno, "check the path and the disk")
    if e.errno == errno.ENOTDIR and path:  # name the file that stands where a folder goes
        blocker = next((p for p in Path(str(path)).parents if p.is_file()), None)
        if blocker:
            return f"'{blocker}' is a file, so '{path}' cannot be made under it; choose another path"
    where = f"'{path}': " if path else ""
    return f"{where}{e.strerror or e}; {fix}"


if __name__ == "__main__":
    sys.exit(main())
