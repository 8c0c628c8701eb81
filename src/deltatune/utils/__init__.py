"""peft's `peft.utils` import paths (`deltatune.utils.hotswap`), for scripts whose import is all that changes."""
