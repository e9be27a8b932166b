"""Benchmarks whose logic lives in the package so that it can be tested (tools/ holds thin shims)."""
