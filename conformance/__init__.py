"""The conformance suite: drives a target and the model side by side (built in a later step)."""
