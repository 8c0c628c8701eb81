"""Every bundled method; importing a module registers it (one line per method)."""

from deltatune.methods import (
    adalora,  # noqa: F401
    dora,  # noqa: F401
    gralora,  # noqa: F401
    lora,  # noqa: F401
    vera,  # noqa: F401
)
