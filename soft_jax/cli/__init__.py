"""The `soft-jax` command line: run | sweep | plan | report | compare | info | generate | train | eval | export | data.

Every user mistake ends with exit code 2 and one line on stderr (what is wrong, where, how to mend it).
"""

from __future__ import annotations

import errno
import shlex
import sys

from soft_jax.cli.commands import EXIT_CONTAMINATED  # noqa: F401 - the exit codes are the CLI's API
from soft_jax.cli.parser import build_parser
from soft_jax.core import compile_cache, storage
from soft_jax.core.errors import UserError
from soft_jax.core.preemption import Preempted

EXIT_USER_ERROR = 2
EXIT_DISK_FULL = 1
EXIT_STORAGE = 1  # a bucket unreachable past retries (soft_jax.core.storage.StorageError)


def _disk_full(e: BaseException) -> OSError | None:
    """The "no space left" OSError behind an exception (libraries such as Orbax wrap it), or None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        e = e.__cause__ or e.__context__
    return None


def _again(argv) -> str:
    """The command line that resumes this run."""
    return "soft-jax " + shlex.join(sys.argv[1:] if argv is None else argv)


# arguments that name files or folders: a URL among them is checked before any work (an output's bucket too)
INPUTS = ("model", "data", "inputs", "workdirs", "truthfulqa_file", "pool")
OUTPUTS = ("out", "workdir", "checkpoint_dir")


def _check_urls(args) -> None:
    for name in INPUTS + OUTPUTS:
        values = getattr(args, name, None)
        for value in values if isinstance(values, list) else [values]:
            if isinstance(value, str) and "://" in value:
                (storage.check_bucket if name in OUTPUTS else storage.check)(value, f"--{name.replace('_', '-')}")


def main(argv=None) -> int:
    storage.configure()  # before anything reaches Cloud Storage: STORAGE_EMULATOR_HOST covers TensorStore too
    try:
        args, rest = build_parser().parse_known_args(argv)
        if rest and args.command not in ("run", "sweep", "plan", "lm-eval") and (
                getattr(args, "data_command", None) != "filter"):
            raise UserError(f"unrecognized arguments: {' '.join(rest)} (see `soft-jax {args.command} --help`)")
        args.overrides = rest
        _check_urls(args)
        if args.command in ("run", "sweep", "eval", "generate", "train", "lm-eval"):
            compile_cache.enable()
        args.fn(args)
    except UserError as e:
        print(f"soft-jax: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except storage.StorageError as e:  # the bucket failed past the client's retries: nothing is half-written
        print(f"soft-jax: error: {e}; finished work is saved: rerun the same command once the bucket is reachable",
              file=sys.stderr)
        return EXIT_STORAGE
    except Preempted as e:  # a signal asked `run` to stop; it stopped at a safe point
        print(f"soft-jax: {e}; progress is saved. resume with: {_again(argv)}", file=sys.stderr)
        return 130 if e.signame == "SIGINT" else 143
    except KeyboardInterrupt:  # a second Ctrl-C during `run` (the first anywhere else): stopped where it was
        words = sys.argv[1:] if argv is None else argv
        hint = (f"; the step or batch in progress is lost, what was saved before it is kept. resume with: "
                f"{_again(argv)}") if words[:1] in (["run"], ["sweep"]) else ""
        print(f"soft-jax: interrupted{hint}", file=sys.stderr)
        return 130
    except Exception as e:  # a full disk is the user's to fix; anything else is a bug
        full = _disk_full(e)
        if full is None:
            raise
        where = f" while writing {full.filename}" if full.filename else ""
        print(f"soft-jax: error: no space left on device{where}; free some space and rerun the same command: "
              "finished rounds and saved progress are intact", file=sys.stderr)
        return EXIT_DISK_FULL
    return 0


if __name__ == "__main__":
    sys.exit(main())
