"""``python -m trivmm``"""

import sys

from trivmm.cli import main

sys.exit(main())
