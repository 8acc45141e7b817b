"""``python -m sweeps {launch,dry_run,status,delete_incomplete,report} ...``"""

import sys

from domainbed_fish.sweep import main

sys.exit(main())
