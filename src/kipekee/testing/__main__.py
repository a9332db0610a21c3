"""``python -m kipekee.testing``: the local SMTP capture server in the foreground."""

import sys

from .smtp import main

sys.exit(main())
