"""``python -m singlestep.train --config FILE [key=value ...]``: train one run described by YAML.

Exit codes: 0 done, 2 user error (one message on stderr, no traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from singlestep.errors import UserError

__all__ = ["main"]

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m singlestep.train",
        description="Train one run described by a YAML config; key=value overrides change any key.",
        epilog="examples: optimizer.lr=1e-3  trainer.clip_grad_norm=null  optimizer.betas=[0.9,0.99]  optimizer=adagrad",
    )
    p.add_argument("--config", help="YAML file describing the run")
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


class _ArgError(UserError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own exit code is 2 too; keep it one line
        raise _ArgError(f"{self.prog}: {message}")


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    warnings.formatwarning = _one_line_warning  # a user reads "warning: why", not our source lines
    parser = _parser()
    parser.__class__ = _Parser
    try:
        args = parser.parse_args(argv)
        if args.list:
            print(_list_components())
            return 0
        if not args.config:
            raise _ArgError(f"{parser.prog}: --config FILE is required (or --list)")
        from singlestep.config import config_to_dict, dump_yaml, load_config

        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(dump_yaml(config_to_dict(cfg)), end="")
            return 0
        from singlestep.trainer import Trainer

        summary = Trainer(cfg).fit()
        return EXIT_INTERRUPTED if summary["interrupted"] else 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    from singlestep import malloc

    try:
        malloc.reexec()  # before torch loads: per-sample steps run faster under tcmalloc/jemalloc
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    sys.exit(main())
