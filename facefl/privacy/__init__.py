"""Privacy: what a server can learn from the updates it receives, and the defences against it."""
