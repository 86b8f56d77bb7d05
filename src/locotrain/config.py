"""Typed configuration: dataclasses, TOML presets, dotted `--set` overrides, clear errors.

A run's config is built in three layers: the defaults below, then a preset or TOML file,
then `--set key=value` overrides. Every key is checked against the dataclasses; a wrong key
gets the nearest valid one suggested, a wrong type names the expected one.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def choice(default: str, *options: str) -> Any:
    """A string field restricted to a fixed set of values."""
    return field(default=default, metadata={"choices": options})


# --------------------------------------------------------------------------- sections


@dataclass
class DataConfig:
    path: str = ""  # "" = the Tiny Shakespeare copy shipped in the package
    train_fraction: float = 0.9  # first 90% trains, last 10% validates (nanoGPT's split)
    shards: str = choice("iid", "iid", "contiguous")  # how workers divide the training text
    # The corpus's content, filled in when it is read, so that a run's config.toml records
    # which text it trained on. Set sha256 to insist on that text: another file fails the run.
    sha256: str = ""  # of the file's bytes (Tiny Shakespeare: of its uncompressed text)
    chars: int = 0  # its length in characters; 0 = not checked


@dataclass
class ModelConfig:
    depth: int = 2
    width: int = 128
    heads: int = 4
    seq_len: int = 64
    dropout: float = 0.0
    softcap: float = 0.0  # tanh soft-capping of logits; 0 = off


@dataclass
class WorkloadConfig:
    name: str = choice("ar_gpt", "ar_gpt", "masked_diffusion")
    context_len: int = 0  # diffusion: leading characters of every window that are never masked
    loopholing: bool = False  # diffusion: carry the hidden state between denoising steps
    self_cond_rate: float = 1.0  # Loopholing: fraction of training batches that use two passes


@dataclass
class TrainConfig:
    tokens: int = 1_200_000  # training tokens summed over all workers
    batch_size: int = 32  # sequences per worker per inner step
    optimizer: str = choice("adamw", "adamw", "lion")
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: float = 0.05  # fraction of training spent in linear warm-up
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1  # on matrices only
    grad_clip: float = 1.0
    seed: int = 0
    device: str = choice("auto", "auto", "cpu", "cuda")
    compile: bool = False  # torch.compile the loss (CUDA only)
    # Intra-op CPU threads; 0 = the cores not already busy (the load average), at least 1:
    # small models gain little from threads and lose badly when the cores are oversubscribed.
    threads: int = 0
    # Tokens between checkpoints (simulated runs; `loco resume DIR` continues from the last
    # one). 0 = none on a schedule; an interrupted run (Ctrl-C, SIGTERM) always writes one.
    checkpoint_every: int = 0


@dataclass
class EvalConfig:
    every: int = 0  # tokens between evaluations; 0 = ten evaluations per run
    windows: int = 0  # validation windows used during training; 0 = all (the final eval uses all)
    samples: int = 16  # diffusion: stratified mask-ratio samples per window
    score_from: int = -1  # score only targets at positions >= this; -1 = workload.context_len
    batch_size: int = 64


@dataclass
class SampleConfig:
    chars: int = 500
    prompt: str = ""
    temperature: float = 0.8
    seed: int = 0
    method: str = choice("confidence", "confidence", "remask")  # diffusion decoding
    threshold: float = 0.9  # confidence decoding: commit every position at least this sure
    steps: int = 16  # remask decoding: denoising steps per block


@dataclass
class CodecSettings:
    """Settings every algorithm reads: what it sends is encoded with `codec` (codecs.py)."""
    codec: str = "fp32"  # fp32 | bf16 | int8 | fp4: what goes on the wire
    codec_block: int = 128  # values per quantisation scale (int8, fp4)


@dataclass
class AlgorithmSection:
    """`[algorithm]`: the chosen algorithm and its settings.

    Each algorithm declares the keys it reads in its own dataclass, next to its code
    (algorithms/<name>.py). Keys written directly under `[algorithm]` (or `--set
    algorithm.KEY=...`) belong to the chosen algorithm, and a key it does not read is an
    error. Tables `[algorithm.<name>]` hold settings for one algorithm each and are read only
    when that algorithm runs, so a preset can carry settings for several (what `loco compare`
    switches between). Precedence: defaults, then `[algorithm.<name>]`, then direct keys."""
    name: str = "ddp"
    settings: Any = None  # the chosen algorithm's settings (its own dataclass)
    tables: dict = field(default_factory=dict)  # the other algorithms' tables, as written


@dataclass
class CompareConfig:
    algorithms: list[str] = field(default_factory=lambda: ["ddp", "diloco", "streaming"])
    target_bpc: float = 0.0  # 0 = the first algorithm's best validation bpc + target_margin_bpc
    target_margin_bpc: float = 0.05


@dataclass
class WorkerSpec:
    region: str = "r0"
    speed: float = 1.0  # relative speed on top of the device's
    device: str = ""  # catalogue name; "" = cluster.device
    batch_size: int = 0  # sequences per step; 0 = train.batch_size
    count: int = 1  # repeat this worker `count` times
    join_s: float = 0.0  # joins the run at this simulated time (not every algorithm: setup.py)


@dataclass
class SlowdownSpec:
    """A worker computes `factor` times slower during [start_s, end_s)."""
    worker: int = 0
    start_s: float = 0.0
    end_s: float = 0.0
    factor: float = 2.0


@dataclass
class OutageSpec:
    """The link from region `src` to region `dst` carries nothing during [start_s, end_s)."""
    src: str = ""
    dst: str = ""
    start_s: float = 0.0
    end_s: float = 0.0


@dataclass
class CrashSpec:
    """Worker `worker` crashes at `at_s` and, with restart_after_s >= 0, comes back that much
    later (from the top of its process, with a fresh inner optimizer). `notice_s` > 0 makes
    it a preemption announced that long before (logged; algorithms do not act on it)."""
    worker: int = 0
    at_s: float = 0.0
    restart_after_s: float = -1.0  # -1: never
    notice_s: float = 0.0


@dataclass
class LinkLossSpec:
    """The link from region `src` to region `dst` goes down for good at `at_s`."""
    src: str = ""
    dst: str = ""
    at_s: float = 0.0


@dataclass
class TraceSpec:
    """Piecewise-constant bandwidth of one inter-region link: `gbps[i]` from `times_s[i]`."""
    src: str = ""
    dst: str = ""
    times_s: list[float] = field(default_factory=list)
    gbps: list[float] = field(default_factory=list)


@dataclass
class FailureSpec:
    """A seeded random schedule of stragglers and link outages over `horizon_s` seconds."""
    seed: int = 0
    horizon_s: float = 0.0  # 0 = no random events
    straggler_rate_per_hour: float = 0.0  # per worker
    straggler_factor: float = 3.0
    straggler_duration_s: float = 60.0
    outage_rate_per_hour: float = 0.0  # per inter-region link
    outage_duration_s: float = 30.0
    crash_rate_per_hour: float = 0.0  # per worker
    restart_after_s: float = 300.0  # -1: crashed workers never come back


@dataclass
class ClusterConfig:
    preset: str = choice("single", "single", "two-datacenters", "mixed-fleet", "halos-4x4",
                         "world", "custom")
    size: int = 0  # workers for presets that take a size; 0 = the preset's default
    regions: list[str] = field(default_factory=list)
    latency_s: list[list[float]] = field(default_factory=list)
    bandwidth_gbps: list[list[float]] = field(default_factory=list)  # 0 = unlimited
    workers: list[WorkerSpec] = field(default_factory=list)
    inter_gbps: float = 0.0  # presets: override the inter-region bandwidth
    inter_latency_s: float = -1.0  # presets: override the inter-region latency
    step_time_s: float = 0.0  # seconds per inner step at speed 1 and train.batch_size; 0 = FLOPs
    # The part of a step that does not shrink with the batch (kernel launches, the optimizer):
    # a step of batch b takes fixed + (step - fixed) b / train.batch_size. 0 = all of it
    # scales (the arithmetic of a large model); a small model on a GPU is mostly fixed cost.
    step_fixed_s: float = 0.0
    device: str = "H100"
    mfu: float = 0.4  # model FLOPs utilisation when step time is derived from FLOPs
    jitter: float = 0.0  # relative std of each compute span (seeded)
    server_compute_s: float = 1e-3  # modelled time of one parameter-server update
    heterogeneity: float = 1.0  # scales each worker's speed gap to the fastest: 0 = all equal
    allreduce: str = choice("ring", "ring", "hierarchical")
    slowdowns: list[SlowdownSpec] = field(default_factory=list)
    outages: list[OutageSpec] = field(default_factory=list)
    traces: list[TraceSpec] = field(default_factory=list)
    crashes: list[CrashSpec] = field(default_factory=list)
    link_losses: list[LinkLossSpec] = field(default_factory=list)
    # What a crash does (docs/simulation.md): "wait" = the worker is down until it restarts,
    # its unfinished compute is redone, everyone who needs it waits (any algorithm);
    # "drop" = its process dies, peers are told and carry on: parameter-server algorithms
    # give its task back, ddp and diloco re-form the group (all-reduces average those alive,
    # a restarted worker heals from a live peer).
    on_crash: str = choice("wait", "wait", "drop")
    failures: FailureSpec = field(default_factory=FailureSpec)


@dataclass
class RuntimeConfig:
    """How a run executes: `engine` for the simulator, the rest for real processes."""
    # How the simulator computes inner steps: "batched" runs every worker that trains at the
    # same time in one stacked computation; "sequential" one worker at a time (the
    # reference). "auto" = batched (docs/benchmarks.md measures both, on CPU and GPU).
    engine: str = choice("auto", "auto", "batched", "sequential")
    # The batched engine's steps as CUDA graphs (torch.compile's "reduce-overhead"), with
    # train.compile on a CUDA device; elsewhere it changes nothing. "auto" = off until
    # docs/benchmarks.md measures whether graphs pay (benchmarks/cuda_graphs.py).
    cuda_graphs: str = choice("auto", "auto", "on", "off")
    # `loco sweep` evaluates the global models of its points together, up to this many in one
    # stacked computation (metrics.EvalQueue); 1 = each when it is due, one at a time. 0 =
    # auto: 8 on a GPU, 1 on a CPU (where stacking measured slower, docs/simulation.md).
    eval_batch: int = 0
    timeout_s: float = 120.0  # a collective or handshake that takes longer is an error
    server_device: str = choice("cpu", "cpu", "auto")  # where parameter servers keep theta
    host: str = ""  # this process's address for messages; "" = the route to MASTER_ADDR
    secret: str = ""  # shared by every rank to authenticate messages; "" = $LOCOTRAIN_SECRET


@dataclass
class PhantomConfig:
    """`loco plan`'s model (planner/phantom.py): sizes, no values. Described directly by
    `params` (and `layers`, with the step time in cluster.step_time_s), or, with params = 0,
    derived from the architecture: [model] depth, width and seq_len, `vocab`, train.batch_size,
    and the step time from FLOPs at cluster.mfu of cluster.device (or cluster.step_time_s)."""
    params: float = 0.0  # parameters (1e9 = 1B); 0 = from the architecture
    layers: int = 0  # blocks the parameters are split into (fragments, buckets); 0 = model.depth
    embedding_params: float = 0.0  # direct description: parameters of the embedding (and of the head)
    vocab: int = 0  # architecture: vocabulary size; 0 = the corpus's (data.path)


@dataclass
class PlanConfig:
    """How `loco plan` simulates (planner/plan.py, docs/planner.md)."""
    rounds: int = 8  # simulated outer rounds (inner steps for ddp); 0 = all of train.tokens
    symmetry: bool = True  # one process per class of identical synchronous workers
    min_gbps: float = 0.001  # --find-bandwidth searches [min_gbps, max_gbps]
    max_gbps: float = 100_000.0


@dataclass
class Config:
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    algorithm: AlgorithmSection = field(default_factory=lambda: build_algorithm_section({}))
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    phantom: PhantomConfig = field(default_factory=PhantomConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)


# --------------------------------------------------------------------------- checks


def validate(cfg: Config) -> None:
    """Impossible settings that are about one section alone. Components check the rest."""
    m, t = cfg.model, cfg.train
    positive = {
        "model.depth": m.depth, "model.width": m.width, "model.heads": m.heads,
        "model.seq_len": m.seq_len, "train.tokens": t.tokens, "train.batch_size": t.batch_size,
        "eval.samples": cfg.eval.samples, "eval.batch_size": cfg.eval.batch_size,
        "sample.chars": cfg.sample.chars, "sample.steps": cfg.sample.steps,
    }
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"{key} must be positive, got {value}")
    if cfg.runtime.eval_batch < 0:
        raise UserError(f"runtime.eval_batch must be >= 0 (0 = auto), got "
                        f"{cfg.runtime.eval_batch}")
    if m.width % m.heads or (m.width // m.heads) % 2:
        raise UserError(
            f"model.width ({m.width}) must split into model.heads ({m.heads}) heads of even size; "
            "pick a width that is a multiple of 2*heads"
        )
    if cfg.runtime.cuda_graphs == "on" and not t.compile:
        raise UserError("runtime.cuda_graphs = on replays torch.compile's graphs; set "
                        "train.compile = true too, or leave cuda_graphs at auto")
    if not 0.0 < cfg.data.train_fraction < 1.0:
        raise UserError(f"data.train_fraction must be in (0, 1), got {cfg.data.train_fraction}")
    if not 0.0 <= m.dropout < 1.0:
        raise UserError(f"model.dropout must be in [0, 1), got {m.dropout}")
    if t.lr <= 0 or not 0 <= t.min_lr_ratio <= 1 or not 0 <= t.warmup < 1:
        raise UserError("train.lr must be > 0, train.min_lr_ratio in [0, 1], train.warmup in [0, 1)")
    if not 0 <= cfg.workload.context_len < m.seq_len:
        raise UserError(
            f"workload.context_len ({cfg.workload.context_len}) must be in [0, model.seq_len)"
        )
    if cfg.workload.name != "masked_diffusion" and (
        cfg.workload.context_len or cfg.workload.loopholing
    ):
        raise UserError(
            "workload.context_len and workload.loopholing apply to masked_diffusion only; "
            "set workload.name=masked_diffusion or drop them"
        )
    w = cfg.workload
    if w.name == "masked_diffusion" and 0 <= cfg.eval.score_from < w.context_len:
        raise UserError(f"eval.score_from ({cfg.eval.score_from}) must be >= workload.context_len "
                        f"({w.context_len}): the diffusion model never learned to fill its prefix")
    if not 0 < cfg.sample.threshold <= 1:
        raise UserError(f"sample.threshold must be in (0, 1], got {cfg.sample.threshold}")
    if not cfg.sample.temperature >= 0:
        raise UserError(f"sample.temperature must be >= 0 (0 = greedy), got "
                        f"{cfg.sample.temperature}")
    _resolve_cluster_size(cfg.cluster)


def _resolve_cluster_size(c: ClusterConfig) -> None:
    """cluster.size = 0 means the preset's default; the resolved config records the real
    number of workers instead, so config.toml says what ran. A size the preset ignores
    (halos-4x4, custom, explicit cluster.workers) must match what runs, or it misleads."""
    from .cluster import expand_preset  # cluster.py imports this module (and no torch)

    if c.size < 0:
        raise UserError(f"cluster.size must be >= 0 (0 = the preset's default), got {c.size}")
    if not c.inter_gbps >= 0:
        raise UserError(f"cluster.inter_gbps must be >= 0 (0 = the preset's own), got "
                        f"{c.inter_gbps}")
    workers = sum(w.count for w in expand_preset(c).workers)
    if c.size == 0:
        c.size = workers
    elif c.size != workers:
        raise UserError(f"cluster.size = {c.size}, but this cluster has {workers} workers "
                        f"(cluster.preset = '{c.preset}'"
                        f"{' with cluster.workers' if c.workers else ''}); drop cluster.size "
                        "or make it match")


# --------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "table"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    return names.get(tp, str(tp))


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f, tp in zip(dataclasses.fields(cls), typing.get_type_hints(cls).values()):
        path = f"{prefix}{f.name}"
        keys.append(path)
        if dataclasses.is_dataclass(tp):
            keys += _all_keys(tp, path + ".")
    return keys


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is AlgorithmSection:
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a table, got {value!r}")
        return build_algorithm_section(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a table, got {value!r}")
        return _build(tp, value, where + ".")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UserError(f"{where} must be a {_type_name(tp)}, got {value!r}")
        return [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and type(value) is tp:
        return value
    raise UserError(f"{where} must be {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise UserError(_unknown_key(f"{prefix}{key}"))
        kwargs[key] = _convert(value, hints[key], f"{prefix}{key}")
    obj = cls(**kwargs)
    for f in dataclasses.fields(cls):
        options = f.metadata.get("choices")
        if options and getattr(obj, f.name) not in options:
            raise UserError(
                f"{prefix}{f.name} = {getattr(obj, f.name)!r} is not one of: {', '.join(options)}"
            )
    return obj


def _settings_keys(name: str) -> list[str]:
    from .algorithms import settings_class

    return [f.name for f in dataclasses.fields(settings_class(name))]


def build_algorithm_section(data: dict) -> AlgorithmSection:
    """The [algorithm] table -> the chosen algorithm's typed settings, checked key by key."""
    from .algorithms import ALGORITHMS, settings_class

    name = data.get("name", "ddp")
    if name not in ALGORITHMS:
        near = difflib.get_close_matches(str(name), ALGORITHMS, n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        raise UserError(f"algorithm.name = {name!r} is not an algorithm; {hint}choose one of: "
                        f"{', '.join(ALGORITHMS)}")
    tables, direct = {}, {}
    for key, value in data.items():
        if key == "name":
            continue
        if key in ALGORITHMS:
            if not isinstance(value, dict):
                raise UserError(f"algorithm.{key} is {key}'s table of settings, not a value; "
                                f"write [algorithm.{key}] or --set algorithm.{key}.KEY=VALUE")
            for k in value:
                if k not in _settings_keys(key):
                    raise UserError(_not_read(key, k, f"algorithm.{key}.{k}"))
            _build(settings_class(key), value, f"algorithm.{key}.")  # types and choices
            tables[key] = value
        else:
            direct[key] = value
    for key in direct:
        if key not in _settings_keys(name):
            raise UserError(_not_read(name, key, f"algorithm.{key}"))
    settings = _build(settings_class(name), {**tables.pop(name, {}), **direct}, "algorithm.")
    return AlgorithmSection(name, settings, tables)


def _not_read(name: str, key: str, path: str) -> str:
    """A key that algorithm `name` does not read: say who reads it, or what was meant."""
    from .algorithms import ALGORITHMS

    readers = [a for a in ALGORITHMS if key in _settings_keys(a)]
    if readers:
        where = (f"it is read by {', '.join(readers)}; settings for another algorithm go in "
                 f"its own table, e.g. --set algorithm.{readers[0]}.{key}=...")
    else:
        near = difflib.get_close_matches(key, _settings_keys(name), n=1, cutoff=0.6)
        where = f"did you mean '{near[0]}'?" if near else "no algorithm reads it"
    return (f"{path}: {name} has no setting '{key}' ({where}); {name} reads: "
            f"{', '.join(_settings_keys(name))}")


def _unknown_key(path: str) -> str:
    return f"unknown config key '{path}' ({_key_hint(path)})"


def _key_hint(path: str) -> str:
    """Suggest a key of the same table: as strings, 'train.foo' is nearest to 'train', but
    whoever wrote it meant a key under train."""
    *tables, leaf = re.sub(r"\[\d+\]", "", path).split(".")  # list items: their table's keys
    tp = Config
    for i, name in enumerate(tables):
        hints = typing.get_type_hints(tp)
        if name not in hints:  # a misspelt table: compare whole keys
            near = difflib.get_close_matches(path, all_keys(), n=1, cutoff=0.6)
            return f"did you mean '{near[0]}'?" if near else "`loco list --keys` shows them all"
        tp = hints[name]
        while typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
        if not dataclasses.is_dataclass(tp):
            return f"'{'.'.join(tables[:i + 1])}' is a value, not a table"
    names = [f.name for f in dataclasses.fields(tp)]
    near = difflib.get_close_matches(leaf, names, n=1, cutoff=0.6)
    table = path.rpartition(".")[0]
    if near:
        return f"did you mean '{table + '.' if table else ''}{near[0]}'?"
    return f"{table or 'the top level'} has: {', '.join(names)}"


def _parse_value(text: str) -> Any:
    """A --set value is a TOML literal; anything that does not parse is a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _set_dotted(data: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(_unknown_key(path))
        node = child
    node[parts[-1]] = value


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("locotrain.presets").iterdir()
                  if p.name.endswith(".toml"))


def read_source(source: str) -> tuple[str, dict]:
    """Resolve a preset name or a TOML path to (name, table)."""
    path = Path(source)
    if source.endswith(".toml") or path.exists():
        if not path.is_file():
            raise UserError(f"config file '{source}' does not exist; give a TOML path or one of "
                            f"the presets: {', '.join(preset_names())}")
        text, name = path.read_text(encoding="utf-8", errors="replace"), path.stem
    elif source in preset_names():
        text = resources.files("locotrain.presets").joinpath(f"{source}.toml").read_text()
        name = source
    else:
        near = difflib.get_close_matches(source, preset_names(), n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        raise UserError(f"no preset or file named '{source}'; {hint}presets: "
                        f"{', '.join(preset_names())}")
    try:
        return name, tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"'{source}' is not valid TOML: {e}") from None


def load_config(source: str = "quickstart", overrides: list[str] = ()) -> tuple[str, Config]:
    """Build the config from a preset name or TOML path plus `key=value` overrides."""
    name, data = read_source(source)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got '{item}'")
        key, text = item.split("=", 1)
        _set_dotted(data, key.strip(), _parse_value(text.strip()))
    cfg = _build(Config, data)
    validate(cfg)
    return name, cfg


def config_from_dict(data: dict) -> Config:
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------- writing TOML


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(cfg: Config) -> str:
    """The fully resolved config as TOML (what `config.toml` in a run folder holds). The
    chosen algorithm's settings are written in full in its own table, so the file still
    loads with another `algorithm.name`."""
    lines = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, AlgorithmSection):
            lines += ["", "[algorithm]", f"name = {_toml_value(value.name)}"]
            tables = {**value.tables, value.name: dataclasses.asdict(value.settings)}
            for name, table in tables.items():
                lines += ["", f"[algorithm.{name}]"]
                lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
        elif dataclasses.is_dataclass(value):
            lines += ["", f"[{f.name}]"]
            lines += [f"{k} = {_toml_value(v)}" for k, v in dataclasses.asdict(value).items()]
        else:
            lines.insert(0, f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def describe_keys() -> list[str]:
    """`loco list --keys`: every key with its default, grouped by section; each algorithm's
    settings under the algorithm that reads them."""
    from .algorithms import ALGORITHMS, settings_class

    lines = []
    for f in dataclasses.fields(Config):
        default = getattr(Config(), f.name) if f.name != "algorithm" else None
        if f.name == "algorithm":
            lines.append("algorithm.name = \"ddp\"  (one of: " + ", ".join(ALGORITHMS) + ")")
            lines.append("  # algorithm.KEY sets KEY for the chosen algorithm; "
                         "algorithm.<name>.KEY for one algorithm only")
            for name in ALGORITHMS:
                for k, v in dataclasses.asdict(settings_class(name)()).items():
                    lines.append(f"algorithm.{name}.{k} = {_toml_value(v)}")
        elif dataclasses.is_dataclass(default):
            for k, v in dataclasses.asdict(default).items():
                lines.append(f"{f.name}.{k} = {_toml_value(v)}")
        else:
            lines.append(f"{f.name} = {_toml_value(default)}")
    return lines


def all_keys() -> list[str]:
    """Every key: the sections' keys, `algorithm.name`, and `algorithm.<name>.<key>` for the
    settings of every algorithm."""
    from .algorithms import ALGORITHMS

    keys = [k for k in _all_keys(Config) if not k.startswith("algorithm")]
    keys.append("algorithm.name")
    keys += [f"algorithm.{a}.{k}" for a in ALGORITHMS for k in _settings_keys(a)]
    return keys
