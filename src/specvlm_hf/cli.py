"""The `specvlm` command line: `specvlm {demo,pocket,train,bench} ...`.

Each sub-command lives in its own module exposing `make_parser()` and `main(argv)`; this file only dispatches, so
`specvlm demo --help` costs no heavy imports until a sub-command is chosen. A `specvlm_hf.errors.UserError` raised by a
sub-command (bad file, bad flag value, missing optional extra) is printed as one line and exits with status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("specvlm_hf.demo", "Run one prompt with and without speculation (the README's main command)."),
    "pocket": ("specvlm_hf.pocket.cli", "Build, inspect or retrain the offline pocket VLM."),
    "train": ("specvlm_hf.training.cli", "Train a draft for a target with online-logit distillation."),
    "bench": ("specvlm_hf.bench.cli", "Measure speedup and acceptance vs generate, prompt lookup, assisted."),
}


def _usage() -> str:
    lines = ["usage: specvlm <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", "Run `specvlm <command> --help` for the command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"specvlm: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    from .errors import UserError

    try:
        module = importlib.import_module(COMMANDS[name][0])
        return int(module.main(rest) or 0)
    except UserError as error:  # the user's input, not a bug: one actionable line, no traceback
        print(f"specvlm {name}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"specvlm {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
