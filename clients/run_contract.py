"""``make test-clients``: every client's contract scenario, then clients/README.md's examples.

The scenarios (clients/*/) run against the server OTP_TARGET names, with OTP_TOKEN and, as
comma-separated lists of four, OTP_TEST_NUMBER and OTP_TEST_CODE (one number per scenario, so one
scenario's send does not trip the next one's cooldown). Without OTP_TARGET they run against a
server this script starts: production mode, a private Redis, test numbers, and the service
tests' fake Interakt, which takes messages only for UNREACHABLE_NUMBERS (one per scenario, as
OTP_UNREACHABLE_NUMBER) and reports each failed, not on WhatsApp. The Python client's scenario
runs twice: in the environment running this script (.venv, as uv.lock pins it; `make
test-latest`'s newest versions), and in a virtualenv of the client alone at the lowest versions
its pyproject.toml allows.

The examples run against a dev server configured as `make run` configures it (dev.env): each
fenced ```python, ```ts, ```go and ```sh block of clients/README.md as written, twice in a row,
and each run must exit 0 having verified a code. Indented blocks (install commands) are not run.

Outside CI a missing Node 20 or Go toolchain skips that language with one line saying so; with
CI=true that is a failure. The last line counts what passed, failed and was skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, NoReturn

from prometheus_client.parser import text_string_to_metric_families

from otp_service.connections.embedded_redis import EmbeddedRedis, free_port

if TYPE_CHECKING:
    from tests.fake_interakt import FakeInterakt

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
BIN = Path(sys.executable).parent  # the environment's own tools: otp-service, grpcurl
UV = ROOT / ".tools/bin/uv"
# The Python client alone, as another team installs it, on the lowest versions it allows.
CLIENT_VENV = VENV / "client-python-lowest"
GOPATH = VENV / "gopath"  # holds only the link to clients/go as otp-service/clients/go
DEBIAN_GOPATH = Path("/usr/share/gocode")
NODE = ROOT / "clients/node"
CI = os.environ.get("CI") == "true"
# The contract scenarios: the language each is in, and the toolchain it needs.
SCENARIOS = (
    ("python", "python"),
    ("python (lowest versions)", "python"),
    ("node", "node"),
    ("go", "go"),
)
# One test number per contract scenario.
SCENARIO_NUMBERS = [
    ("+919999900011", "135790"),
    ("+919999900012", "975310"),
    ("+919999900013", "864200"),
    ("+919999900014", "531975"),
]
# Numbers that are not on WhatsApp, one per scenario: the server sends them a code, and the fake
# Interakt it talks to reports each message failed, as Interakt does (WhatsApp's 131026).
UNREACHABLE_NUMBERS = ["+919999900021", "+919999900022", "+919999900023", "+919999900024"]
NOT_ON_WHATSAPP = ("Message undeliverable", 131026)
# What clients/README.md has a TypeScript project install to compile the example.
TS_TOOLS = ("typescript@5.9.3", "@types/node@20.19.43")
EXAMPLE_RUNS = 2  # each example in a row, with no flush between: it must work every time
GO_PACKAGES = (
    "golang-go golang-google-grpc-dev golang-github-golang-protobuf-1-5-dev "
    "golang-google-protobuf-dev"
)
STARTUP_SECONDS = 60
STEP_SECONDS = 600


class Skip(Exception):
    """This machine lacks a toolchain; the message says which and how to get it."""


class Failed(Exception):
    """A check failed; the message has what it printed."""


def missing(what: str) -> NoReturn:
    if CI:
        raise Failed(f"{what} (with CI=true nothing is skipped)")
    raise Skip(what)


@dataclass(frozen=True)
class Server:
    target: str
    token: str
    http: str


def main() -> int:
    started = time.monotonic()
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    said_skip: set[str] = set()

    def check(name: str, language: str, step: Callable[[], None]) -> None:
        began = time.monotonic()
        try:
            step()
        except Skip as exc:
            counts["skipped"] += 1
            if language not in said_skip:
                said_skip.add(language)
                print(f"{language}: skipped: {exc}", flush=True)
            return
        except Failed as exc:
            counts["failed"] += 1
            print(f"{name}: FAILED ({time.monotonic() - began:.1f} s)\n{exc}", flush=True)
            return
        counts["passed"] += 1
        print(f"{name}: ok ({time.monotonic() - began:.1f} s)", flush=True)

    scenarios = scenario_targets()
    with own_server() as server:
        if scenarios is None:
            scenarios = [
                {"OTP_TARGET": server.target, "OTP_TOKEN": server.token,
                 "OTP_TEST_NUMBER": number, "OTP_TEST_CODE": code,
                 "OTP_UNREACHABLE_NUMBER": unreachable}
                for (number, code), unreachable in zip(
                    SCENARIO_NUMBERS, UNREACHABLE_NUMBERS, strict=True
                )
            ]  # fmt: skip
        print(f"test-clients: contract scenarios against {scenarios[0]['OTP_TARGET']}", flush=True)
        for (name, toolchain), env in zip(SCENARIOS, scenarios, strict=True):
            step = functools.partial(CONTRACTS[name], env)
            check(f"{name} contract", toolchain, step)
    with own_server(dev=True) as server:
        print(f"test-clients: clients/README.md's examples against {server.target}", flush=True)
        env = {"OTP_TARGET": server.target, "OTP_TOKEN": server.token, "OTP_HTTP": server.http}
        for index, (language, source) in enumerate(readme_examples(), start=1):
            toolchain = {"ts": "node", "sh": "python"}.get(language, language)
            for run_number in range(1, EXAMPLE_RUNS + 1):
                check(
                    f"clients/README.md example {index} ({language}), run {run_number}",
                    toolchain,
                    functools.partial(run_example, server, env, language, source),
                )
    print(f"test-clients: took {time.monotonic() - started:.0f} s")
    # The last line in the plain form CI reads: N passed, N failed, N skipped.
    passed, failed, skipped = counts["passed"], counts["failed"], counts["skipped"]
    print(f"test-clients: {passed} passed, {failed} failed, {skipped} skipped")
    return 1 if counts["failed"] else 0


def scenario_targets() -> list[dict[str, str]] | None:
    """The scenarios' variables when OTP_TARGET names a server, one set per language."""
    target = os.environ.get("OTP_TARGET")
    if not target:
        return None
    token = os.environ.get("OTP_TOKEN", "")
    numbers = os.environ.get("OTP_TEST_NUMBER", "").split(",")
    codes = os.environ.get("OTP_TEST_CODE", "").split(",")
    if not token or len(numbers) != len(SCENARIOS) or len(codes) != len(SCENARIOS):
        sys.exit(
            "test-clients: with OTP_TARGET, set OTP_TOKEN, and OTP_TEST_NUMBER and OTP_TEST_CODE "
            f"to {len(SCENARIOS)} comma-separated test numbers and their codes (one per scenario)"
        )
    return [
        {"OTP_TARGET": target, "OTP_TOKEN": token, "OTP_TEST_NUMBER": n, "OTP_TEST_CODE": c}
        for n, c in zip(numbers, codes, strict=True)
    ]


@contextlib.contextmanager
def own_server(*, dev: bool = False) -> Iterator[Server]:
    """``otp-service serve`` with test numbers: in production mode, with the fake Interakt of
    the service's tests, which takes messages only for UNREACHABLE_NUMBERS and reports each
    failed; or ``dev``, as `make run` serves it (dev.env), for the examples."""
    grpc_port, http_port = free_port(), free_port()
    with (
        EmbeddedRedis() as embedded,
        tempfile.TemporaryFile("w+") as log,
        fake_interakt() as interakt,
    ):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OTP_", "INTERAKT_"))}
        env.update(
            REDIS_URL=embedded.url,
            OTP_GRPC_ADDRESS=f"127.0.0.1:{grpc_port}",
            OTP_HTTP_ADDRESS=f"127.0.0.1:{http_port}",
        )
        if dev:
            token = "dev"  # noqa: S105 (what the dev server accepts: clients/README.md)
            env.update(dev_settings())
        else:
            token = secrets.token_urlsafe(24)
            webhook_secret = secrets.token_hex(16)
            # A code for any other number is refused (outside the 24-hour window): loudly.
            interakt.in_window = set(UNREACHABLE_NUMBERS)
            interakt.failed_with = NOT_ON_WHATSAPP
            webhook = f"http://127.0.0.1:{http_port}/webhooks/interakt"
            interakt.send_reports_to(webhook, webhook_secret, "failed")
            env.update(
                OTP_SECRET=secrets.token_hex(16),
                INTERAKT_API_KEY=fake_api_key(),
                INTERAKT_CHANNEL="text",
                INTERAKT_BASE_URL=interakt.base_url,
                INTERAKT_WEBHOOK_SECRET=webhook_secret,
                OTP_CLIENT_TOKENS=f"contract:{token}",
                OTP_TEST_NUMBERS=",".join(f"{n}:{c}" for n, c in SCENARIO_NUMBERS),
                OTP_ALLOW_TEST_NUMBERS="true",
            )
        command = [str(BIN / "otp-service"), "serve", *(["--dev"] if dev else [])]
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        http = f"http://127.0.0.1:{http_port}"
        try:
            wait_ready(process, http, log)
            yield Server(f"127.0.0.1:{grpc_port}", token, http)
        finally:
            process.terminate()
            process.wait(timeout=30)


@contextlib.contextmanager
def fake_interakt() -> Iterator[FakeInterakt]:
    """tests/fake_interakt.py's fake, serving on loopback from an event loop of its own."""
    sys.path.insert(0, str(ROOT))
    # Imported here, once ROOT is on the path: the fake lives in the service's tests.
    from tests.fake_interakt import FakeInterakt

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-interakt", daemon=True)
    thread.start()
    fake = asyncio.run_coroutine_threadsafe(FakeInterakt().start(), loop).result(STARTUP_SECONDS)
    try:
        yield fake
    finally:
        asyncio.run_coroutine_threadsafe(fake.stop(), loop).result(STARTUP_SECONDS)
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def fake_api_key() -> str:
    from tests.fake_interakt import API_KEY  # fake_interakt() put ROOT on the path

    return API_KEY


def dev_settings() -> dict[str, str]:
    """What `make run` sets for the dev server: dev.env's ``NAME=value`` lines."""
    lines = (ROOT / "dev.env").read_text().splitlines()
    pairs = (line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))
    return {name.strip(): value.strip() for name, value in pairs}


def wait_ready(process: subprocess.Popen[bytes], http: str, log: IO[str]) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            sys.exit(f"test-clients: the server exited:\n{log.read()}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{http}/readyz", timeout=2) as answer,  # noqa: S310
        ):
            if answer.status == 200:
                return
        time.sleep(0.2)
    sys.exit(f"test-clients: the server was not ready within {STARTUP_SECONDS} s")


def run(command: list[str], env: Mapping[str, str], *, cwd: Path = ROOT, stdin: str = "") -> str:
    """Run ``command``; its output, or Failed with it when it exits non-zero."""
    try:
        done = subprocess.run(
            command,
            cwd=cwd,
            env={**os.environ, **env},
            input=stdin,
            capture_output=True,
            text=True,
            timeout=STEP_SECONDS,
        )
    except subprocess.TimeoutExpired as exc:
        raise Failed(f"{' '.join(command)} took over {STEP_SECONDS} s") from exc
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise Failed(f"$ {' '.join(command)}\n{output}")
    return output


# The toolchains: each returns what its commands need, or skips (fails in CI) without it.


@functools.cache
def python_client() -> Path:
    """The Python of a venv holding the client package alone (and pytest), installed from
    ./clients/python as clients/README.md says, with the lowest version of every dependency
    that its pyproject.toml allows (uv's ``--resolution lowest``: the same versions on any day).
    The venv is made again whenever pyproject.toml changes; the package is installed anew each
    run."""
    python = CLIENT_VENV / "bin/python"
    stamp = CLIENT_VENV / ".installed"
    project = ROOT / "clients/python/pyproject.toml"
    uv_env = {"VIRTUAL_ENV": str(CLIENT_VENV)}
    if not stamp.exists() or stamp.stat().st_mtime < project.stat().st_mtime:
        run([str(UV), "venv", "--quiet", str(CLIENT_VENV)], {})
        lowest = ["--resolution", "lowest", "./clients/python[test]"]
        run([str(UV), "pip", "install", "--quiet", *lowest], uv_env)
        stamp.touch()
    else:
        again = ["--no-deps", "--reinstall-package", "otp-service-client", "./clients/python"]
        run([str(UV), "pip", "install", "--quiet", *again], uv_env)
    return python


@functools.cache
def node_package() -> Path:
    """The Node client packed as clients/README.md says (npm pack), for a project to install."""
    node()
    destination = VENV / "client-node"
    shutil.rmtree(destination, ignore_errors=True)
    destination.mkdir(parents=True)
    run(["npm", "pack", "--silent", "--pack-destination", str(destination)], {}, cwd=NODE)
    (tarball,) = destination.glob("*.tgz")
    return tarball


def node() -> None:
    version = shutil.which("node") and run(["node", "--version"], {}).strip()
    if not version or int(version.lstrip("v").split(".")[0]) < 20:
        missing(f"Node 20 or newer is needed (found {version or 'no node'})")
    if not (NODE / "node_modules/.bin/tsc").exists():
        missing("clients/node has no node_modules: run make install")


def go() -> dict[str, str]:
    """The environment of a GOPATH-mode build against Debian's Go source trees."""
    if shutil.which("go") is None or not (DEBIAN_GOPATH / "src/google.golang.org/grpc").is_dir():
        missing(f"Go and Debian's Go packages are needed: apt-get install {GO_PACKAGES}")
    link = GOPATH / "src/otp-service/clients/go"
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(ROOT / "clients/go")
    return {"GO111MODULE": "off", "GOPATH": f"{GOPATH}:{DEBIAN_GOPATH}", "GOFLAGS": ""}


GO_PACKAGE_PATHS = ["otp-service/clients/go/otp/v1", "otp-service/clients/go/otpclient"]


def python_contract(python: Callable[[], Path], env: Mapping[str, str]) -> None:
    config = ["-c", "clients/python/pyproject.toml", "--rootdir", "clients/python"]
    test = "clients/python/tests/test_contract.py"
    run([str(python()), "-m", "pytest", "-q", "-p", "no:cacheprovider", *config, test], env)


def node_contract(env: Mapping[str, str]) -> None:
    node()
    run(["npm", "--prefix", str(NODE), "test"], env)


def go_contract(env: Mapping[str, str]) -> None:
    go_env = {**go(), **env}
    unformatted = run(["gofmt", "-l", "clients/go/otpclient"], {})
    if unformatted:
        raise Failed(f"not gofmt-formatted:\n{unformatted}")
    run(["go", "vet", *GO_PACKAGE_PATHS], go_env, cwd=GOPATH)
    run(["go", "test", "-count=1", *GO_PACKAGE_PATHS], go_env, cwd=GOPATH)


CONTRACTS: dict[str, Callable[[Mapping[str, str]], None]] = {
    "python": functools.partial(python_contract, lambda: Path(sys.executable)),
    "python (lowest versions)": functools.partial(python_contract, python_client),
    "node": node_contract,
    "go": go_contract,
}


def readme_examples() -> list[tuple[str, str]]:
    text = (ROOT / "clients/README.md").read_text()
    return re.findall(r"^```(python|ts|go|sh)\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)


def run_example(server: Server, env: dict[str, str], language: str, source: str) -> None:
    """Run one README example against ``server``; it must verify a code."""
    before = verified(server.http)
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        if language == "python":
            run([str(python_client()), "-"], env, stdin=source)
        elif language == "sh":
            tools = [CLIENT_VENV / "bin", BIN, ROOT / "tools/node_modules/.bin"]
            python_client()
            path = os.pathsep.join([*map(str, tools), os.environ["PATH"]])
            run(["bash", "-euo", "pipefail", "-c", source], {**env, "PATH": path})
        elif language == "ts":
            # A project of its own that installs the packed client, then compiles and runs the
            # example as clients/README.md says.
            (directory / "package.json").write_text('{"name": "example", "private": true}')
            npm = ["npm", "install", "--silent", "--no-audit", "--no-fund"]
            run([*npm, str(node_package())], {}, cwd=directory)
            run([*npm, "--save-dev", *TS_TOOLS], {}, cwd=directory)
            (directory / "example.ts").write_text(source)
            tsc = ["npx", "tsc", "--strict", "--module", "commonjs", "--target", "es2022"]
            run([*tsc, "--types", "node", "example.ts"], {}, cwd=directory)
            run(["node", "example.js"], env, cwd=directory)
        else:
            go_env = go()
            (directory / "main.go").write_text(source)
            run(["go", "run", "main.go"], {**go_env, **env}, cwd=directory)
    if verified(server.http) <= before:
        raise Failed("it ran, but no code was verified")


def verified(http: str) -> float:
    """How many codes the server has verified (otp_verifications_total)."""
    with urllib.request.urlopen(f"{http}/metrics", timeout=10) as answer:  # noqa: S310
        text = answer.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "otp_verifications_total" and sample.labels["outcome"] == "verified"
    )


if __name__ == "__main__":
    sys.exit(main())
