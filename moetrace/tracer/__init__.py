"""moetrace.tracer"""
