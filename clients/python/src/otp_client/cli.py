"""``otp-client send PHONE``, ``otp-client verify PHONE CODE`` and ``otp-client status PHONE``:
one call, one line of output.

The exit status is 0 only for a code that was sent or verified, or a status that was found;
anything else prints one line saying why and exits 1 (2 for a usage error).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from otp_client._client import DEFAULT_TIMEOUT, OtpClient, OtpStatus, Tls
from otp_client._errors import OtpError

EXIT_NOT_DONE = 1
EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="otp-client", description=__doc__)
    parser.add_argument(
        "--target", default=os.environ.get("OTP_TARGET"), help="host:port (default: $OTP_TARGET)"
    )
    parser.add_argument(
        "--token", default=os.environ.get("OTP_TOKEN"), help="caller token (default: $OTP_TOKEN)"
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds the call may take"
    )
    parser.add_argument("--tls", action="store_true", help="use TLS, trusting the system's CAs")
    parser.add_argument("--ca", metavar="PEM", help="use TLS, trusting this CA file")
    commands = parser.add_subparsers(dest="command", required=True)
    send = commands.add_parser("send", help="send a new code to PHONE")
    send.add_argument("phone")
    verify = commands.add_parser("verify", help="check CODE for PHONE")
    verify.add_argument("phone")
    verify.add_argument("code")
    status = commands.add_parser("status", help="what became of PHONE's latest code")
    status.add_argument("phone")
    args = parser.parse_args(argv)

    for name in ("target", "token"):
        if not getattr(args, name):
            parser.error(f"--{name} or $OTP_{name.upper()} is required")
    try:
        tls = _tls(args.tls, args.ca)
    except OSError as exc:
        print(f"otp-client: cannot read the CA file: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with OtpClient(args.target, args.token, tls=tls, timeout=args.timeout) as client:
            if args.command == "send":
                sent = client.send_otp(args.phone)
                print(
                    f"sent ({sent.channel.name.lower()}): valid until "
                    f"{sent.expires_at.isoformat(timespec='seconds')}, "
                    f"resend allowed in {sent.resend_after_seconds} s"
                )
                return 0
            if args.command == "status":
                print(_describe_status(client.get_otp_status(args.phone)))
                return 0
            result = client.verify_otp(args.phone, args.code)
    except OtpError as exc:
        print(f"otp-client: {_describe(exc)}", file=sys.stderr)
        return EXIT_NOT_DONE
    if result.verified:
        print("verified")
        return 0
    left = f": {result.attempts_remaining} attempts left" if result.attempts_remaining else ""
    print(f"not verified: {result.outcome.name.lower().replace('_', ' ')}{left}")
    return EXIT_NOT_DONE


def _tls(on: bool, ca: str | None) -> Tls | None:
    if ca is not None:
        with open(ca, "rb") as file:
            return Tls(root_certificates=file.read())
    return Tls() if on else None


def _describe_status(status: OtpStatus) -> str:
    state = status.state.name.lower()
    if status.failure_reason:
        state += f" ({status.failure_reason})"
    via = f"via {status.channel.name.lower()}"
    if status.message_id:
        via += f" as message {status.message_id}"
    return (
        f"{state} {via}; {'verified' if status.verified else 'not verified'}; valid until "
        f"{status.expires_at.isoformat(timespec='seconds')}; resend allowed in "
        f"{status.resend_after_seconds} s"
    )


def _describe(exc: OtpError) -> str:
    line = f"{exc.reason or exc.code.name}: {exc.message}"
    if exc.retry_after is not None:
        line += f" (retry in {exc.retry_after:g} s)"
    return " ".join(line.split())  # one line, whatever the message holds
