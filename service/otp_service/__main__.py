import sys

from otp_service.cli import main

sys.exit(main())
