"""The kit for plugin authors: conformance checks, the pytest plugin, the hook reference.

* `kvprof.testing.conformance`: run a strategy on a tiny model (`check_strategy`) or take a
  recorded trace (`check_trace`) and report what breaks the contract.
* `kvprof.testing.checks`: the contract's rules, one function per rule, each taking a Trace.
* `kvprof.testing.pytest_plugin`: the `kvprof_conformance` fixture (entry point `pytest11`).
* `kvprof.testing.hookref`: renders the hook reference (docs/hooks.md) from the hookspecs.
"""
