"""``python -m sweeps {launch,dry_run,status,delete_incomplete,report,reproduce} ...``

``reproduce`` is ``python -m domainbed_fish.reproduction`` (the paper's own experiments).
"""

import sys

if len(sys.argv) > 1 and sys.argv[1] == "reproduce":
    from domainbed_fish.reproduction.__main__ import main as reproduce

    sys.exit(reproduce(sys.argv[2:]))

from domainbed_fish.sweep import main

sys.exit(main())
