"""``python -m otp_service.store NAME``: print the Lua script NAME as Redis runs it."""

import sys

from otp_service.store.scripts import SCRIPTS

if len(sys.argv) != 2 or sys.argv[1] not in SCRIPTS:
    sys.exit(f"usage: python -m otp_service.store NAME, NAME one of: {', '.join(SCRIPTS)}")
sys.stdout.write(SCRIPTS[sys.argv[1]])
