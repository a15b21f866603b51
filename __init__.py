"""edgeops: compile ONNX models for edge hardware, ship them to fleets, serve them on devices."""

__version__ = "0.1.0"
