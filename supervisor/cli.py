"""The `fluxgate-supervisor` command line (README "Command line"): start, check, reload, token.

Everything except `start` runs here and exits quickly; `start` hands over to
`fluxgate_supervisor.app.run`, imported only then so that `--help`, `check` and
`token` work without the server's dependencies being importable.

Exit codes: 0 success, 1 a problem with the file, pid file or process,
2 a usage error (argparse's convention, also for `reload` without
`--pid-file`: `start` writes no pid file unless asked, so there is nothing
to default to; and for `start` with a logging variable of the environment
set to a value it does not know, which would otherwise be ignored).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from fluxgate.configfile import ConfigFileError, ConfigInvalid, LoadedConfig, load_config_file
from fluxgate.logs import LEVELS
from fluxgate.validation import MAX_WORKERS

DISTRIBUTION = "fluxgate-gateway"  # the name on PyPI (`fluxgate` is another project)
DEFAULT_CONFIG = "./fluxgate.yaml"
DEFAULT_TOKEN_TTL = 3600
TOKEN_SUBJECT = "fluxgate-cli"
# A token's lifetime: ten years is longer than any operator's need, and keeps
# `exp` far inside what every JWT library reads as a date.
MAX_TOKEN_TTL = 10 * 365 * 24 * 3600
# The allowed values of the logging variables (README "Logs"), compared case-insensitively.
LOG_STYLES = ("auto", "always", "never")
LOG_FORMATS = ("text", "json")
_NUMBER_DIGITS = 12  # longer input is out of every bound below: not even converted


def _whole_number(minimum: int, maximum: int, bound: str) -> Callable[[str], int]:
    """An argparse type: a whole number from `minimum` to `maximum` (`bound` says so)."""

    def parse(text: str) -> int:
        digits = text.strip().lstrip("+-")
        if not (digits.isascii() and digits.isdigit()):
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
        if len(digits) > _NUMBER_DIGITS or not minimum <= int(text) <= maximum:
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text.strip()[:20]}")
        return int(text)

    return parse


_worker_count = _whole_number(
    1, MAX_WORKERS, f"from 1 to {MAX_WORKERS} (the connection table's worker bound)"
)
_token_ttl = _whole_number(0, MAX_TOKEN_TTL, f"from 0 to {MAX_TOKEN_TTL} (ten years)")


def logging_environment_problems(env: Mapping[str, str]) -> list[str]:
    """Logging variables set to values fluxgate.logs would silently replace by defaults.

    An empty value counts as unset (fluxgate.logs reads it so).
    """
    allowed = {
        "FLUXGATE_LOG": tuple(LEVELS),
        "FLUXGATE_LOG_STYLE": LOG_STYLES,
        "FLUXGATE_LOG_FORMAT": LOG_FORMATS,
    }
    problems = []
    for name, choices in allowed.items():
        value = env.get(name, "").strip()
        if value and value.upper() not in {c.upper() for c in choices}:
            problems.append(
                f"{name}={value[:40]!r} is not one of {', '.join(choices)} (any letter case)"
            )
    return problems


def _version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fluxgate-supervisor",
        description="Fluxgate: a streaming reverse proxy in front of LLM providers.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def config_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--config",
            metavar="PATH",
            default=DEFAULT_CONFIG,
            help=f"configuration file (default: {DEFAULT_CONFIG})",
        )

    start = commands.add_parser(
        "start",
        help="run the supervisor in the foreground until SIGTERM/SIGINT",
        description="Run the supervisor and its workers in the foreground until SIGTERM or "
        "SIGINT. SIGHUP reloads the configuration.",
    )
    config_option(start)
    start.add_argument(
        "--workers",
        metavar="N",
        type=_worker_count,
        help=f"number of worker processes, 1 to {MAX_WORKERS} "
        "(default: server.workers, else the CPU count)",
    )
    start.add_argument(
        "--pid-file", metavar="PATH", help="write the supervisor's pid here (default: none)"
    )

    check = commands.add_parser(
        "check",
        help="validate a configuration file and list every problem",
        description="Validate the file as the supervisor would. Exit 0 if valid, 1 if not.",
    )
    config_option(check)

    reload = commands.add_parser(
        "reload",
        help="send SIGHUP to a running supervisor",
        description="Ask a running supervisor to re-read its configuration (SIGHUP).",
    )
    reload.add_argument(
        "--pid-file",
        metavar="PATH",
        required=True,
        help="the pid file given to `start --pid-file` (start writes none otherwise)",
    )

    token = commands.add_parser(
        "token",
        help="print an HS256 JWT signed with an api_keys.jwt entry",
        description="Print an HS256 JWT signed with the api_keys.jwt entry whose id is KID.",
    )
    token.add_argument("--kid", metavar="ID", required=True, help="id of the api_keys.jwt entry")
    token.add_argument(
        "--ttl",
        metavar="SECONDS",
        type=_token_ttl,
        default=DEFAULT_TOKEN_TTL,
        help=f"lifetime in seconds, at most {MAX_TOKEN_TTL}; 0 = no expiry "
        f"(default: {DEFAULT_TOKEN_TTL})",
    )
    config_option(token)
    for sub in (start, check, reload, token):
        sub.set_defaults(subparser=sub)
    return parser


def _error(message: str) -> int:
    print(f"fluxgate-supervisor: error: {message}", file=sys.stderr)
    return 1


def _load(path: str) -> LoadedConfig | int:
    """The loaded configuration, or the exit code after reporting why not."""
    try:
        return load_config_file(path)
    except ConfigFileError as exc:
        return _error(str(exc))
    except ConfigInvalid as exc:
        for problem in exc.errors:
            print(f"{path}: {problem}", file=sys.stderr)
        return 1


def cmd_check(path: str) -> int:
    loaded = _load(path)
    if isinstance(loaded, int):
        return loaded
    config = loaded.config
    print(
        f"OK: {path} is valid ({len(config.upstreams)} upstreams, "
        f"{len(config.static_keys)} static keys, {len(config.jwt_keys)} JWT keys)"
    )
    # Valid, yet the proxy would refuse every request: say so (still exit 0).
    if not config.upstreams:
        print(
            f"warning: {path}: no upstreams: every request will be refused (401 or 404)",
            file=sys.stderr,
        )
    if not config.has_credentials:
        print(
            f"warning: {path}: no api_keys: every request will be refused with 401",
            file=sys.stderr,
        )
    return 0


def cmd_reload(pid_file: str) -> int:
    try:
        text = Path(pid_file).read_text(encoding="ascii", errors="replace").strip()
    except FileNotFoundError:
        return _error(f"{pid_file}: no such pid file (is the supervisor running?)")
    except OSError as exc:
        return _error(f"{pid_file}: cannot read the pid file: {exc.strerror or exc}")
    # pid 0 and negative pids address whole process groups: never signal those.
    if not text.isdigit() or len(text) > 10 or int(text) < 1:
        return _error(f"{pid_file}: does not contain a process id")
    pid = int(text)
    problem = _not_a_supervisor(pid)
    if problem is not None:
        return _error(f"process {pid} from {pid_file} {problem}")
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return _error(f"no process with pid {pid} (stale pid file {pid_file}?)")
    except PermissionError:
        return _error(f"not allowed to signal process {pid}")
    print(f"sent SIGHUP to the supervisor (pid {pid})")
    return 0


SUPERVISOR_TITLE = "fluxgate: supervisor "  # supervisor.app.master_title
SCRIPT_NAME = "fluxgate-supervisor"


def _argv(pid: int) -> list[str] | None:
    try:
        data = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return data.decode(errors="replace").rstrip("\0").split("\0")


def _is_master(argv: list[str]) -> bool:
    """A command line of `fluxgate-supervisor start`, before or after it is retitled."""
    if " ".join(argv).startswith(SUPERVISOR_TITLE):
        return True
    # Before the title is set: [python] /path/fluxgate-supervisor start ...
    return any(
        os.path.basename(arg) == SCRIPT_NAME and argv[i + 1 : i + 2] == ["start"]
        for i, arg in enumerate(argv[:2])
    )


def _parent(pid: int) -> int | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = data.rsplit(b")", 1)[-1].split()  # the command name may hold spaces
    return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None


def _not_a_supervisor(pid: int) -> str | None:
    """Why `pid` is not a running Fluxgate supervisor master, or None if it is one.

    SIGHUP terminates most programs: a stale pid file naming an unrelated
    process (say a `tail -f fluxgate.log`) or a worker must not receive it.
    """
    argv = _argv(pid)
    if argv is None:
        if not os.path.isdir("/proc/self"):
            return "cannot be checked: /proc is not available"
        return "is not running (stale pid file?)"
    # A worker first: just after its fork it still carries the master's title.
    parent = _parent(pid)
    parent_argv = _argv(parent) if parent else None
    if parent_argv is not None and _is_master(parent_argv):
        return f"is a worker of the supervisor {parent}, not the supervisor"
    if not _is_master(argv):
        return "is not a fluxgate supervisor (stale pid file?)"
    return None


def cmd_token(path: str, kid: str, ttl: int) -> int:
    import jwt  # only this command needs it

    loaded = _load(path)
    if isinstance(loaded, int):
        return loaded
    secret = loaded.config.jwt_keys.get(kid)
    if secret is None:
        ids = ", ".join(sorted(loaded.config.jwt_keys)) or "none"
        return _error(f"{path}: no api_keys.jwt entry with id {kid!r} (configured ids: {ids})")
    now = int(time.time())
    claims: dict[str, object] = {"sub": TOKEN_SUBJECT, "iat": now}
    if ttl:
        claims["exp"] = now + ttl
    print(jwt.encode(claims, secret, algorithm="HS256", headers={"kid": kid, "typ": "JWT"}))
    return 0


def cmd_start(config: str, workers: int | None, pid_file: str | None) -> int:
    from .app import run  # the server stack, loaded only when serving

    return int(run(config_path=config, workers=workers, pid_file=pid_file))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "check":
        return cmd_check(args.config)
    if args.command == "reload":
        return cmd_reload(args.pid_file)
    if args.command == "token":
        return cmd_token(args.config, args.kid, args.ttl)
    problems = logging_environment_problems(os.environ)
    if problems:
        print(f"fluxgate-supervisor: error: {'; '.join(problems)}", file=sys.stderr)
        return 2
    return cmd_start(args.config, args.workers, args.pid_file)


if __name__ == "__main__":
    sys.exit(main())
