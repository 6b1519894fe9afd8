"""Throughput benchmarks of cas: corpus generator, end-to-end runner and inner-loop tests."""
