"""One rank of a real run: the entry point `loco launch` starts on every rank, and the one
to give torchrun for several machines:

    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        -m locotrain.distributed two-datacenters --out runs/x

It builds the run (setup.py: the algorithm, its processes), then runs this rank's process
on runtime/torchdist.py, which knows no algorithm. Errors a user can cause end the rank
with one line (exit 2); a lost peer with one line (exit 1); a bug keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from .config import load_config
from .errors import UserError
from .runtime.dist_checkpoint import StoppedAtCheckpoint
from .runtime.launch import die_with_launcher
from .runtime.torchdist import DistRuntime, PeerFailure
from .runtime.transport import SECRET_ENV, resolve_secret
from .setup import build


def main(argv: list[str] | None = None) -> int:
    die_with_launcher()  # first thing: a rank of `loco launch` must not outlive it
    ap = argparse.ArgumentParser(prog="python -m locotrain.distributed")
    ap.add_argument("config", nargs="?", default="quickstart")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--out")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--prepared", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
    args = ap.parse_args(argv)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if "LOCOTRAIN_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["LOCOTRAIN_THREADS"]))

    def lost_contact(e: BaseException) -> bool:
        """An error of torch.distributed or of a connection: the other processes are gone or
        unreachable. (A bug of ours keeps its traceback.)"""
        if isinstance(e, (dist.DistError, ConnectionError, TimeoutError)):
            return True
        tb = e.__traceback__  # e.g. gloo's plain RuntimeError, raised inside torch.distributed
        while isinstance(e, RuntimeError) and tb is not None:
            if f"torch{os.sep}distributed{os.sep}" in tb.tb_frame.f_code.co_filename:
                return True
            tb = tb.tb_next
        return False

    rt, code, finished = None, 0, False
    try:
        _, cfg = load_config(args.config, args.set)
        # Fail before the rendezvous without a usable secret; from here on the rank reads it
        # from its environment, so that it never reaches the run folder's config.toml.
        os.environ[SECRET_ENV] = resolve_secret(cfg.runtime.secret)
        cfg.runtime.secret = ""
        rt = DistRuntime(cfg, build(cfg), rank, world, local_rank,
                         Path(args.out) if args.out else None, args.force,
                         args.prepared or args.resume, resume=args.resume)
        if rt.ckpt.enabled:  # stop at the next common checkpoint instead of dying mid-round
            signal.signal(signal.SIGTERM, lambda *_: setattr(rt.ckpt, "stop_requested", True))
        rt.run()
        rt.finish()
        finished = True
    except UserError as e:
        print(f"loco: error: {e}", file=sys.stderr)
        code = 2
    except StoppedAtCheckpoint as e:
        if e.announce:
            print(f"loco: stopped at a checkpoint; continue with `loco resume {args.out}`",
                  file=sys.stderr)
        code = 128 + signal.SIGTERM
        finished = True  # a stop, not a failure: peers are told goodbye
    except PeerFailure as e:
        print(f"loco: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print(f"loco: rank {rank}: interrupted", file=sys.stderr)
        code = 130
    except Exception as e:
        if not lost_contact(e):
            raise
        # One line: torch's messages can carry a C++ stack after the first.
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        print(f"loco: rank {rank}: lost contact with the other processes ({first})", file=sys.stderr)
        code = 1
    finally:
        if rt is not None:
            try:
                if not finished:  # no goodbye: peers waiting on this rank must see it die
                    rt.transport.close(goodbye=False)
                rt.close()
            except Exception as e:
                if not lost_contact(e):
                    raise
    return code


if __name__ == "__main__":
    sys.exit(main())
