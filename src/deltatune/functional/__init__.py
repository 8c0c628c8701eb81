"""Pure tensor math: no module state, each function tested against a dense formula or a round trip."""
