"""``python -m megatron_rpt.config explain [KEY]``: see :func:`megatron_rpt.config.main`."""

import sys

from megatron_rpt.config import main

sys.exit(main())
