"""The `fluxgate-supervisor` command line (SPEC §2): start, check, reload, token.

Everything except `start` runs here and exits quickly; `start` hands over to
`fluxgate_supervisor.app.run`, imported only then so that `--help`, `check` and
`token` work without the server's dependencies being importable.

Exit codes: 0 success, 1 a problem with the file, pid file or process,
2 a usage error (argparse's convention, also for `reload` without
`--pid-file`: `start` writes no pid file unless asked, so there is nothing
to default to).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fluxgate.configfile import ConfigFileError, ConfigInvalid, LoadedConfig, load_config_file

DISTRIBUTION = "fluxgate-gateway"  # the name on PyPI (`fluxgate` is another project)
DEFAULT_CONFIG = "./fluxgate.yaml"
DEFAULT_TOKEN_TTL = 3600
TOKEN_SUBJECT = "fluxgate-cli"


def _whole_number(minimum: int, bound: str) -> Callable[[str], int]:
    """An argparse type: a whole number of at least `minimum` (`bound` says so)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


_positive_int = _whole_number(1, "at least 1")
_non_negative_int = _whole_number(0, "0 or more")


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
        type=_positive_int,
        help="number of worker processes (default: server.workers, else the CPU count)",
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
        help="the pid file given to `start --pid-file` (required: start writes none otherwise)",
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
        type=_non_negative_int,
        default=DEFAULT_TOKEN_TTL,
        help=f"lifetime in seconds; 0 = no expiry (default: {DEFAULT_TOKEN_TTL})",
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
    return 0


def cmd_reload(pid_file: str) -> int:
    try:
        text = Path(pid_file).read_text(encoding="ascii", errors="replace").strip()
    except FileNotFoundError:
        return _error(f"{pid_file}: no such pid file (is the supervisor running?)")
    except OSError as exc:
        return _error(f"{pid_file}: cannot read the pid file: {exc.strerror or exc}")
    # pid 0 and negative pids address whole process groups: never signal those.
    if not text.isdigit() or int(text) < 1:
        return _error(f"{pid_file}: does not contain a process id")
    pid = int(text)
    if not _looks_like_fluxgate(pid):
        return _error(
            f"process {pid} from {pid_file} is not a fluxgate supervisor (stale pid file?)"
        )
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return _error(f"no process with pid {pid} (stale pid file {pid_file}?)")
    except PermissionError:
        return _error(f"not allowed to signal process {pid}")
    print(f"sent SIGHUP to the supervisor (pid {pid})")
    return 0


def _looks_like_fluxgate(pid: int) -> bool:
    """Guard against a stale pid file naming an unrelated process, which SIGHUP
    would usually terminate. Without /proc (not Linux) the check is skipped."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # no such process (os.kill will say so), or no /proc at all
        return True
    return b"fluxgate" in cmdline


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
        if args.pid_file is None:
            args.subparser.error("--pid-file PATH is required (the file given to start --pid-file)")
        return cmd_reload(args.pid_file)
    if args.command == "token":
        return cmd_token(args.config, args.kid, args.ttl)
    return cmd_start(args.config, args.workers, args.pid_file)


if __name__ == "__main__":
    sys.exit(main())
