"""moetrace.tuner"""
