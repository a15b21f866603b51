"""The device side: verifies and installs releases, serves inference, reports telemetry.

Invariant: nothing under edgeops.agent imports edgeops.compiler, edgeops.fleet, TensorFlow or a web
framework; it runs on 512 MB devices.
"""
