"""``python -m singlestep.train --config FILE [key=value ...]``: train one run described by YAML.

``python -m singlestep.train --resume RUN_DIR [trainer.epochs=N]`` continues a run from its newest
checkpoint, with the numbers an uninterrupted run would have had.

Exit codes: 0 done, 2 user error (one message on stderr, no traceback), 3 stopped because training
went wrong (non-finite steps, a diverging loss: summary.json says why), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from singlestep import cli
from singlestep.errors import UserError

__all__ = ["main"]



def _parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m singlestep.train",
        description="Train one run described by a YAML config; key=value overrides change any key.",
        epilog="examples: optimizer.lr=1e-3  trainer.clip_grad_norm=null  optimizer.betas=[0.9,0.99]  optimizer=adagrad",
    )
    p.add_argument("--config", help="YAML file describing the run")
    p.add_argument("--resume", metavar="RUN_DIR|CHECKPOINT",
                   help="continue a run from its newest checkpoint (or this one); key=value may extend "
                        "trainer.epochs or trainer.max_steps")  # fmt: skip
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted key path = YAML value")
    p.add_argument("--print-config", action="store_true", help="print the fully resolved config and exit")
    p.add_argument("--list", action="store_true", help="list registered models, datasets, optimizers, schedulers")
    return p


def _list_components() -> str:
    from singlestep.registry import DATASETS, MODELS, OPTIMIZERS, SCHEDULERS, load_builtins

    load_builtins()
    lines = []
    for title, registry in (("models", MODELS), ("datasets", DATASETS), ("optimizers", OPTIMIZERS),
                            ("schedulers", SCHEDULERS)):  # fmt: skip
        lines.append(f"{title}:")
        width = max((len(e.name) for e in registry.entries()), default=0)
        lines += [f"  {e.name:<{width}}  {e.description}" for e in registry.entries()]
    lines.append("any torch.optim.Optimizer subclass also works by import path, e.g. 'torch.optim.SGD'")
    return "\n".join(lines)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    warnings.formatwarning = _one_line_warning  # a user reads "warning: why", not our source lines
    return cli.run(lambda: _main(_parser(), argv))


def _main(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    args = parser.parse_intermixed_args(argv)  # key=value before and after the options
    if args.list:
        print(_list_components())
        return 0
    if args.config and args.resume:
        raise UserError(f"{parser.prog}: give --config or --resume, not both (a resumed run keeps its own config)")
    if not args.config and not args.resume:
        raise UserError(f"{parser.prog}: --config FILE is required (or --resume RUN_DIR, or --list)")
    from singlestep.config import config_to_dict, dump_yaml, load_config

    resume = None
    if args.resume:
        from singlestep.checkpoint import Resume, check_belongs, find_checkpoint, load_checkpoint, resume_config

        run_dir, path = find_checkpoint(args.resume)
        state = load_checkpoint(path)
        check_belongs(run_dir, state, path)
        cfg = resume_config(state, args.overrides, str(path))
        resume = Resume(run_dir, path, state)
    else:
        cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_yaml(config_to_dict(cfg)), end="")
        return 0
    from singlestep.distributed import session
    from singlestep.trainer import Trainer

    with session(cfg, resume.state.get("world_size", 1) if resume else None) as dist:  # under torchrun: the process group (gloo / NCCL); else nothing
        summary = Trainer(cfg, resume=resume, dist=dist).fit()
    return {"ok": 0, "interrupted": cli.EXIT_INTERRUPTED, "diverged": cli.EXIT_STOPPED}[summary["status"]]


if __name__ == "__main__":
    from singlestep import malloc

    try:
        malloc.reexec()  # before torch loads: per-sample steps run faster under tcmalloc/jemalloc
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(cli.EXIT_USER_ERROR)
    sys.exit(main())
