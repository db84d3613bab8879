"""Tests that run in one process: the math, the protocol, the models, and learner + actors in one process over
real ZeroMQ sockets (some start a single helper process, e.g. a BLAS or sandbox child)."""
