"""python -m warehouse_gdpr_demo [stop]"""

import sys

from .run import main, stop

raise SystemExit(stop() if sys.argv[1:] == ["stop"] else main())
