"""python -m warehouse_gdpr_demo [ui|stop]"""

import sys

from .run import main, stop

if sys.argv[1:] == ["ui"]:
    from .ui import start

    raise SystemExit(start())
raise SystemExit(stop() if sys.argv[1:] == ["stop"] else main())
