"""The sample systems that `tidings demo` runs; each is plain async code over a store.

`tidings.demo.ledger` is the seed article's account ledger: event sourcing in four events.
"""
