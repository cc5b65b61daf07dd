"""`python -m appliance.cli`, as the `appliance` command."""

import sys

from appliance.cli import main

sys.exit(main())
