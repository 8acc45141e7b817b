"""``python -m sweeps {launch,dry_run,status,delete_incomplete,report,reproduce} ...``

``reproduce`` is ``python -m domainbed_fish.reproduction`` (the paper's own experiments).
"""

import sys

from domainbed_fish.sweep import main  # hands "reproduce ..." to the reproduction

sys.exit(main())
